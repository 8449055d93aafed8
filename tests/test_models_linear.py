"""Linear models, weight layouts and TrainConfig.

Known-answer vectors (tests/vectors/models_linear.json) hold losses and
gradients computed by PyTorch autograd in float64; regenerate them with
``python tests/test_models_linear.py`` (needs torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ModelError
from edge_sdk.models import (
    LinearRegression,
    LogisticRegression,
    OnnxModel,
    SoftmaxRegression,
    TrainConfig,
    WeightLayout,
    zoo,
)

VECTORS = Path(__file__).parent / "vectors" / "models_linear.json"


def _vector_inputs() -> dict[str, Any]:
    rng = np.random.default_rng(2024)
    x = np.round(rng.normal(size=(5, 3)), 3)
    return {
        "x": x,
        "y_reg": np.round(rng.normal(size=5), 3),
        "y_bin": np.array([0, 1, 1, 0, 1]),
        "y_cls": np.array([0, 2, 1, 3, 2]),
        "coef": np.round(rng.normal(size=3), 3),
        "intercept": np.round(rng.normal(size=1), 3),
        "weight": np.round(rng.normal(size=(3, 4)), 3),
        "bias": np.round(rng.normal(size=4), 3),
        "mlp": {
            "fc1.weight": np.round(rng.normal(size=(2, 3)), 3),
            "fc1.bias": np.round(rng.normal(size=2), 3),
            "fc2.weight": np.round(rng.normal(size=(4, 2)), 3),
            "fc2.bias": np.round(rng.normal(size=4), 3),
        },
    }


def regenerate_vectors() -> None:  # pragma: no cover - run by hand
    """Recompute the vectors with PyTorch (dev-only dependency)."""
    import torch

    v = _vector_inputs()
    t = {k: torch.tensor(val, dtype=torch.float64) for k, val in v.items() if k != "mlp"}
    out: dict[str, Any] = {
        "generator": "torch autograd, float64 (tests/test_models_linear.py)",
        "inputs": {
            k: (val.tolist() if k != "mlp" else {n: a.tolist() for n, a in val.items()})
            for k, val in v.items()
        },
    }

    def record(name: str, loss: Any, params: dict[str, Any]) -> None:
        loss.backward()
        out[name] = {
            "loss": float(loss.detach()),
            "grads": {k: p.grad.numpy().reshape(-1).tolist() for k, p in params.items()},
        }

    coef, icpt = t["coef"].clone().requires_grad_(), t["intercept"].clone().requires_grad_()
    record(
        "linear_regression",
        torch.nn.functional.mse_loss(t["x"] @ coef + icpt, t["y_reg"]),
        {"coef": coef, "intercept": icpt},
    )
    coef, icpt = t["coef"].clone().requires_grad_(), t["intercept"].clone().requires_grad_()
    record(
        "logistic_regression",
        torch.nn.functional.binary_cross_entropy_with_logits(t["x"] @ coef + icpt, t["y_bin"]),
        {"coef": coef, "intercept": icpt},
    )
    weight, bias = t["weight"].clone().requires_grad_(), t["bias"].clone().requires_grad_()
    record(
        "softmax_regression",
        torch.nn.functional.cross_entropy(t["x"] @ weight + bias, t["y_cls"].long()),
        {"weight": weight, "bias": bias},
    )
    p = {k: torch.tensor(a, dtype=torch.float64, requires_grad=True) for k, a in v["mlp"].items()}
    hidden = torch.relu(t["x"] @ p["fc1.weight"].T + p["fc1.bias"])
    logits = hidden @ p["fc2.weight"].T + p["fc2.bias"]
    record("onnx_mlp", torch.nn.functional.cross_entropy(logits, t["y_cls"].long()), p)
    VECTORS.write_text(json.dumps(out, indent=1) + "\n")


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def _inputs(vectors: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in vectors["inputs"].items() if k != "mlp"}


def _check(model: Any, x: np.ndarray, y: np.ndarray, expected: dict[str, Any], rtol: float) -> None:
    loss, grad = model.loss_and_grad(x, y)
    assert loss == pytest.approx(expected["loss"], rel=rtol)
    want = np.concatenate([np.asarray(expected["grads"][n]) for n in model.layout.names])
    np.testing.assert_allclose(grad, want, rtol=rtol, atol=1e-6)


def test_linear_regression_matches_the_vector(vectors: dict[str, Any]) -> None:
    v = _inputs(vectors)
    model = LinearRegression(3)
    model.set_weights({"coef": v["coef"], "intercept": v["intercept"]})
    _check(model, v["x"], v["y_reg"], vectors["linear_regression"], 1e-6)


def test_logistic_regression_matches_the_vector(vectors: dict[str, Any]) -> None:
    v = _inputs(vectors)
    model = LogisticRegression(3)
    model.set_weights({"coef": v["coef"], "intercept": v["intercept"]})
    _check(model, v["x"], v["y_bin"], vectors["logistic_regression"], 1e-6)


def test_softmax_regression_matches_the_vector(vectors: dict[str, Any]) -> None:
    v = _inputs(vectors)
    model = SoftmaxRegression(3, 4)
    model.set_weights({"weight": v["weight"], "bias": v["bias"]})
    _check(model, v["x"], v["y_cls"], vectors["softmax_regression"], 1e-6)


def test_onnx_mlp_matches_the_vector(vectors: dict[str, Any]) -> None:
    v = _inputs(vectors)
    model = OnnxModel(zoo.mlp(3, 2, 4))
    model.set_weights({k: np.asarray(a) for k, a in vectors["inputs"]["mlp"].items()})
    _check(model, v["x"], v["y_cls"], vectors["onnx_mlp"], 1e-5)


# -- numerical stability ------------------------------------------------------


def test_logistic_loss_is_finite_for_huge_logits() -> None:
    model = LogisticRegression(1)
    model.set_weights({"coef": np.array([1e4]), "intercept": np.array([0.0])})
    x = np.array([[-100.0], [100.0], [-100.0], [100.0]])
    y = np.array([1, 0, 0, 1])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = model.loss_and_grad(x, y)
        probs = model.predict(x)
    # two examples are wrong by a logit of 1e6 each: loss = (1e6 + 1e6) / 4
    assert loss == pytest.approx(5e5, rel=1e-9)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(probs, [0.0, 1.0, 0.0, 1.0])


def test_softmax_loss_is_finite_for_huge_logits() -> None:
    model = SoftmaxRegression(1, 3)
    model.set_weights({"weight": np.array([[1e4, -1e4, 0.0]]), "bias": np.zeros(3)})
    x = np.array([[100.0], [-100.0]])
    y = np.array([1, 0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = model.loss_and_grad(x, y)
        probs = model.predict(x)
    # example 1: logits (1e6, -1e6, 0), label 1 -> 2e6; example 2: label 0 -> 2e6
    assert loss == pytest.approx(2e6, rel=1e-9)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_linear_regression_converges_to_least_squares() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.7 + 0.05 * rng.normal(size=200)
    model = LinearRegression(4)
    model.fit(x, y, config=TrainConfig(epochs=60, batch_size=20, lr=0.05), seed=0)
    design = np.hstack([x, np.ones((200, 1))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    np.testing.assert_allclose(model.get_flat(), solution, atol=2e-2)


def test_one_full_batch_sgd_step_equals_the_formula() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 3)), rng.normal(size=8)
    model = LinearRegression(3)
    model.set_flat(np.array([0.1, -0.2, 0.3, 0.05]))
    w = model.get_flat().astype(np.float64)
    resid = x @ w[:3] + w[3] - y
    grad = np.concatenate([2 * x.T @ resid / 8, [2 * resid.mean()]])
    expected = w - 0.1 * (grad + 0.01 * w)
    model.fit(x, y, config=TrainConfig(batch_size=8, lr=0.1, weight_decay=0.01), seed=0)
    np.testing.assert_allclose(model.get_flat(), expected, rtol=1e-5)


def test_softmax_regression_learns_digits() -> None:
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = zoo.load_digits()
    model = SoftmaxRegression(64, 10)
    model.fit(x_train, y_train, config=TrainConfig(epochs=10, lr=0.5), seed=0)
    assert model.evaluate(x_test, y_test)["accuracy"] > 0.9


@pytest.mark.parametrize(
    ("model", "y"),
    [
        (LogisticRegression(2), np.array([0, 2])),
        (LogisticRegression(2), np.array([0.5, 1.0])),
        (SoftmaxRegression(2, 3), np.array([0, 3])),
        (SoftmaxRegression(2, 3), np.array([-1, 0])),
    ],
)
def test_invalid_labels_are_rejected(model: Any, y: np.ndarray) -> None:
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(np.zeros((2, 2)), y)


@pytest.mark.parametrize(
    "build",
    [
        lambda: LinearRegression(0),
        lambda: LogisticRegression(-1),
        lambda: SoftmaxRegression(3, 1),
        lambda: SoftmaxRegression(3, True),
    ],
)
def test_invalid_dimensions_are_rejected(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


# -- TrainConfig ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": 1.5},
        {"epochs": True},
        {"batch_size": 0},
        {"lr": 0.0},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"weight_decay": -1e-4},
        {"prox_mu": -0.5},
        {"optimizer": "adam"},
        {"max_steps": 0},
        {"lr": "0.1"},
    ],
)
def test_train_config_rejects_invalid_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_train_config_is_frozen() -> None:
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]


# -- WeightLayout -----------------------------------------------------------------

shapes = st.lists(
    st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_layout_split_and_concat_are_inverse(dims: list[tuple[int, ...]]) -> None:
    layout = WeightLayout.from_shapes([(f"w{i}", s) for i, s in enumerate(dims)])
    flat = np.arange(layout.size, dtype=np.float32)
    parts = layout.split(flat)
    assert [p.shape for p in parts.values()] == dims
    np.testing.assert_array_equal(layout.concat(parts), flat)
    for name, part in parts.items():
        start, stop = layout.offset(name)
        np.testing.assert_array_equal(part.reshape(-1), flat[start:stop])


def test_layout_rejects_duplicates_and_bad_input() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        WeightLayout.from_shapes([("a", (1,)), ("a", (2,))])
    layout = WeightLayout.from_shapes([("a", (2,)), ("b", (1,))])
    with pytest.raises(ValueError, match="missing"):
        layout.concat({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="unknown"):
        layout.concat({"a": np.zeros(2), "b": np.zeros(1), "c": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        layout.concat({"a": np.zeros(3), "b": np.zeros(1)})
    with pytest.raises(ValueError):
        layout.split(np.zeros(4, dtype=np.float32))
    assert layout.to_json() == [{"name": "a", "shape": [2]}, {"name": "b", "shape": [1]}]


def test_layout_bounds_the_parameter_count() -> None:
    with pytest.raises(ModelError):
        WeightLayout.from_shapes([("huge", (100_000, 1_000))])


if __name__ == "__main__":  # pragma: no cover
    regenerate_vectors()


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(min_value=1e-3, max_value=0.2),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    prox_mu=st.sampled_from([0.0, 0.01, 1.0]),
)
def test_sgd_steps_follow_the_documented_update(
    lr: float, momentum: float, weight_decay: float, prox_mu: float
) -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=6)
    start = np.array([0.3, -0.1, 0.2], dtype=np.float32)
    anchor = np.array([0.0, 0.5, -0.5], dtype=np.float32)
    model = LinearRegression(2)
    model.set_flat(start)
    cfg = TrainConfig(
        epochs=3,
        batch_size=6,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        prox_mu=prox_mu,
    )
    model.fit(x, y, config=cfg, seed=0, global_weights=anchor)
    # full-batch steps, so the shuffle order does not matter
    w = start.astype(np.float64)
    v = np.zeros(3)
    for _ in range(3):
        resid = x @ w[:2] + w[2] - y
        g = np.concatenate([2 * x.T @ resid / 6, [2 * resid.mean()]])
        g = g + weight_decay * w + prox_mu * (w - anchor)
        v = momentum * v + g
        w = w - lr * v
    np.testing.assert_allclose(model.get_flat(), w, rtol=1e-5, atol=1e-6)
