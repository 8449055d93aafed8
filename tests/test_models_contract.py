"""One contract suite for every Model backend (numpy linear and ONNX)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from edge_sdk.errors import ModelError
from edge_sdk.models import (
    LinearRegression,
    LogisticRegression,
    Model,
    OnnxModel,
    SoftmaxRegression,
    TrainConfig,
    zoo,
)

N_FEATURES = 6


@dataclass(frozen=True)
class Case:
    make: Callable[[], Model]
    x: np.ndarray
    y: np.ndarray
    metric: str
    lr: float


def _blobs(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(classes, N_FEATURES))
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(size=(n, N_FEATURES))
    return x.astype(np.float32), y.astype(np.int64)


def _regression(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    w = rng.normal(size=N_FEATURES)
    y = (x @ w + 0.5 + 0.1 * rng.normal(size=n)).astype(np.float32)
    return x, y


def _cases() -> dict[str, Case]:
    xc, yc = _blobs(90, 3, 1)
    xb, yb = _blobs(80, 2, 2)
    xr, yr = _regression(70, 3)
    return {
        "linear-softmax": Case(lambda: SoftmaxRegression(N_FEATURES, 3), xc, yc, "accuracy", 0.1),
        "linear-logistic": Case(lambda: LogisticRegression(N_FEATURES), xb, yb, "accuracy", 0.1),
        "linear-regression": Case(lambda: LinearRegression(N_FEATURES), xr, yr, "rmse", 0.05),
        "onnx-softmax": Case(
            lambda: OnnxModel(zoo.mlp(N_FEATURES, 8, 3, seed=4)), xc, yc, "accuracy", 0.1
        ),
        "onnx-bce": Case(
            lambda: OnnxModel(zoo.mlp(N_FEATURES, 5, 1, seed=5), loss="binary_cross_entropy"),
            xb,
            yb,
            "accuracy",
            0.1,
        ),
        "onnx-mse": Case(
            lambda: OnnxModel(zoo.mlp(N_FEATURES, (), 1, seed=6), loss="mse"), xr, yr, "rmse", 0.05
        ),
    }


CASES = _cases()


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05)


def test_implements_the_protocol(case: Case) -> None:
    assert isinstance(case.make(), Model)


def test_layout_matches_named_and_flat_weights(case: Case) -> None:
    model = case.make()
    named = model.weights()
    assert tuple(named) == model.layout.names
    for spec in model.layout.specs:
        assert named[spec.name].shape == spec.shape
        assert named[spec.name].dtype == np.float32
    flat = model.get_flat()
    assert flat.dtype == np.float32 and flat.shape == (model.layout.size,)
    np.testing.assert_array_equal(model.layout.concat(named), flat)


def test_set_flat_round_trips_and_is_visible_in_named_weights(case: Case) -> None:
    model = case.make()
    vec = np.random.default_rng(0).normal(size=model.layout.size).astype(np.float32)
    model.set_flat(vec)
    np.testing.assert_array_equal(model.get_flat(), vec)
    start, stop = model.layout.offset(model.layout.names[0])
    np.testing.assert_array_equal(
        model.weights()[model.layout.names[0]].reshape(-1), vec[start:stop]
    )


def test_set_weights_accepts_named_arrays(case: Case) -> None:
    model = case.make()
    named = {k: v + 1.0 for k, v in model.weights().items()}
    model.set_weights(named)
    np.testing.assert_array_equal(model.get_flat(), model.layout.concat(named))


@pytest.mark.parametrize(
    "bad",
    [
        lambda n: np.zeros(n + 1, dtype=np.float32),
        lambda n: np.zeros((1, n), dtype=np.float32),
        lambda n: np.full(n, np.nan, dtype=np.float32),
        lambda n: np.full(n, np.inf, dtype=np.float32),
    ],
    ids=["too-long", "2-d", "nan", "inf"],
)
def test_set_flat_rejects_bad_vectors_without_change(
    case: Case, bad: Callable[[int], np.ndarray]
) -> None:
    model = case.make()
    before = model.get_flat()
    with pytest.raises(ValueError):
        model.set_flat(bad(model.layout.size))
    np.testing.assert_array_equal(model.get_flat(), before)


def test_returned_weights_are_copies(case: Case) -> None:
    model = case.make()
    before = model.get_flat()
    model.get_flat()[:] = 7.0
    for arr in model.weights().values():
        arr[...] = 7.0
    np.testing.assert_array_equal(model.get_flat(), before)


def test_fit_is_deterministic_for_a_seed(case: Case) -> None:
    a, b = case.make(), case.make()
    ra = a.fit(case.x, case.y, config=CFG, seed=11)
    rb = b.fit(case.x, case.y, config=CFG, seed=11)
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())
    assert ra == rb


def test_fit_depends_on_the_seed(case: Case) -> None:
    a, b = case.make(), case.make()
    a.fit(case.x, case.y, config=CFG, seed=1)
    b.fit(case.x, case.y, config=CFG, seed=2)
    assert not np.array_equal(a.get_flat(), b.get_flat())


def test_fit_improves_the_training_metric(case: Case) -> None:
    model = case.make()
    before = model.evaluate(case.x, case.y)
    model.fit(case.x, case.y, config=TrainConfig(epochs=10, batch_size=16, lr=case.lr), seed=0)
    after = model.evaluate(case.x, case.y)
    assert after["loss"] < before["loss"]
    if case.metric == "accuracy":
        assert after["accuracy"] >= 0.85
    else:
        assert after["rmse"] < before["rmse"]


def test_report_counts_examples_steps_and_epochs(case: Case) -> None:
    model = case.make()
    report = model.fit(case.x, case.y, config=TrainConfig(epochs=3, batch_size=32), seed=0)
    n = len(case.x)
    assert report.num_examples == n
    assert report.epochs == 3
    assert report.steps == 3 * (-(-n // 32))
    assert len(report.epoch_losses) == 3 and all(np.isfinite(report.epoch_losses))


def test_max_steps_stops_early(case: Case) -> None:
    model = case.make()
    report = model.fit(
        case.x, case.y, config=TrainConfig(epochs=50, batch_size=8, max_steps=5), seed=0
    )
    assert report.steps == 5 and report.epochs == 1


def test_loss_and_grad_matches_finite_differences(case: Case) -> None:
    model = case.make()
    rng = np.random.default_rng(3)
    model.set_flat(model.get_flat() + 0.1 * rng.normal(size=model.layout.size))
    x, y = case.x[:20], case.y[:20]
    loss, grad = model.loss_and_grad(x, y)
    assert grad.shape == (model.layout.size,) and grad.dtype == np.float32
    w0 = model.get_flat().astype(np.float64)
    for trial in range(3):
        d = rng.normal(size=model.layout.size)
        d /= np.linalg.norm(d)
        eps = 1e-2
        model.set_flat(w0 + eps * d)
        up = model.evaluate(x, y)["loss"]
        model.set_flat(w0 - eps * d)
        down = model.evaluate(x, y)["loss"]
        numeric = (up - down) / (2 * eps)
        assert numeric == pytest.approx(float(grad @ d), rel=2e-2, abs=2e-3), trial
    model.set_flat(w0)
    assert model.evaluate(x, y)["loss"] == pytest.approx(loss, rel=1e-5)


def test_weight_decay_shrinks_the_weights(case: Case) -> None:
    plain, decayed = case.make(), case.make()
    plain.fit(case.x, case.y, config=CFG, seed=0)
    decayed.fit(
        case.x,
        case.y,
        config=TrainConfig(epochs=2, batch_size=16, lr=0.05, weight_decay=5.0),
        seed=0,
    )
    assert np.linalg.norm(decayed.get_flat()) < np.linalg.norm(plain.get_flat())


def test_prox_term_keeps_weights_near_the_global_model(case: Case) -> None:
    plain, prox = case.make(), case.make()
    anchor = plain.get_flat()
    plain.fit(case.x, case.y, config=CFG, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, prox_mu=5.0)
    prox.fit(case.x, case.y, config=cfg, seed=0, global_weights=anchor)
    assert np.linalg.norm(prox.get_flat() - anchor) < np.linalg.norm(plain.get_flat() - anchor)


def test_prox_anchor_defaults_to_the_starting_weights(case: Case) -> None:
    a, b = case.make(), case.make()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, prox_mu=1.0)
    a.fit(case.x, case.y, config=cfg, seed=0)
    b.fit(case.x, case.y, config=cfg, seed=0, global_weights=b.get_flat())
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())


def test_prox_accepts_named_global_weights(case: Case) -> None:
    a, b = case.make(), case.make()
    anchor = a.get_flat() + 0.5
    named = a.layout.split(anchor)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, prox_mu=1.0)
    a.fit(case.x, case.y, config=cfg, seed=0, global_weights=anchor)
    b.fit(case.x, case.y, config=cfg, seed=0, global_weights=named)
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())


def test_momentum_changes_the_trajectory(case: Case) -> None:
    plain, heavy = case.make(), case.make()
    plain.fit(case.x, case.y, config=CFG, seed=0)
    heavy.fit(
        case.x, case.y, config=TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9), seed=0
    )
    assert not np.array_equal(plain.get_flat(), heavy.get_flat())


def test_divergence_raises_and_restores_the_weights(case: Case) -> None:
    model = case.make()
    before = model.get_flat()
    with pytest.raises(ModelError):
        model.fit(
            case.x * 1e3, case.y, config=TrainConfig(epochs=20, batch_size=4, lr=1e38), seed=0
        )
    np.testing.assert_array_equal(model.get_flat(), before)


def test_fit_does_not_modify_the_data(case: Case) -> None:
    x, y = case.x.copy(), case.y.copy()
    case.make().fit(x, y, config=CFG, seed=0)
    np.testing.assert_array_equal(x, case.x)
    np.testing.assert_array_equal(y, case.y)


def test_evaluate_reports_finite_metrics(case: Case) -> None:
    metrics = case.make().evaluate(case.x, case.y)
    assert set(metrics) == {"loss", case.metric}
    assert all(np.isfinite(v) for v in metrics.values())


def test_predict_has_one_row_per_example_and_is_pure(case: Case) -> None:
    model = case.make()
    before = model.get_flat()
    p1 = model.predict(case.x)
    p2 = model.predict(case.x)
    assert p1.shape[0] == len(case.x) and p1.dtype == np.float32
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(model.get_flat(), before)


def test_predict_follows_set_flat(case: Case) -> None:
    model = case.make()
    p1 = model.predict(case.x)
    noise = np.random.default_rng(5).normal(size=model.layout.size)
    model.set_flat(model.get_flat() + noise)
    assert not np.array_equal(p1, model.predict(case.x))


def test_rejects_non_finite_inputs(case: Case) -> None:
    model = case.make()
    x = case.x.copy()
    x[0, 0] = np.nan
    with pytest.raises(ValueError):
        model.fit(x, case.y, config=CFG, seed=0)
    with pytest.raises(ValueError):
        model.evaluate(x, case.y)


def test_rejects_mismatched_lengths(case: Case) -> None:
    with pytest.raises(ValueError):
        case.make().fit(case.x, case.y[:-1], config=CFG, seed=0)


def test_rejects_wrong_feature_count(case: Case) -> None:
    with pytest.raises(ValueError):
        case.make().predict(np.zeros((3, N_FEATURES + 1), dtype=np.float32))


def test_rejects_global_weights_of_the_wrong_size(case: Case) -> None:
    model = case.make()
    cfg = TrainConfig(prox_mu=1.0)
    with pytest.raises(ValueError):
        model.fit(case.x, case.y, config=cfg, seed=0, global_weights=np.zeros(3))


def test_rejects_empty_data(case: Case) -> None:
    with pytest.raises(ValueError):
        case.make().fit(case.x[:0], case.y[:0], config=CFG, seed=0)


def test_config_must_be_a_train_config(case: Case) -> None:
    with pytest.raises(TypeError):
        case.make().fit(case.x, case.y, config={"lr": 0.1}, seed=0)  # type: ignore[arg-type]
