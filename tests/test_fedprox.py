"""FedProx on the device: the proximal term, its bounds, and the round path that announces it."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.config import AggregatorTable, _train_table
from edge_sdk.agent import FitResult, ModelTrainer, check_round_training
from edge_sdk.errors import ConfigError, RemoteProtocolError
from edge_sdk.models import MAX_PROX_MU, Model, OnnxModel, SoftmaxRegression, TrainConfig, zoo
from firmware_sim.engine import SimConfig, run
from tests.agent_peer import wait_for
from tests.test_agent_memory import DIM, keypair, make_agent, world  # noqa: F401

FEATURES, CLASSES = 8, 4


def _skewed_data(seed: int = 3) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """One device's heterogeneous data: nearly all of one class."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, FEATURES)).astype(np.float32)
    y = np.where(rng.random(120) < 0.9, 2, rng.integers(0, CLASSES, 120)).astype(np.int64)
    x[y == 2] += 1.5
    return x, y


def _softmax() -> Model:
    model = SoftmaxRegression(FEATURES, CLASSES)
    model.set_flat(np.random.default_rng(0).normal(0, 0.1, model.layout.size))
    return model


def _onnx() -> Model:
    return OnnxModel(zoo.mlp(FEATURES, 6, CLASSES, seed=0))


def _distance_after_training(factory: Any, mu: float) -> float:
    """||w_local - w_global|| after local training from the global model."""
    model = factory()
    w_global = model.get_flat()
    x, y = _skewed_data()
    trainer = ModelTrainer(model, x, y)
    config = {"epochs": 8, "lr": 0.1, "batch_size": 16, "prox_mu": mu}
    result = trainer.fit(w_global.copy(), config, seed=5)
    return float(np.linalg.norm(result.weights.astype(np.float64) - w_global))


@pytest.mark.parametrize("factory", [_softmax, _onnx], ids=["softmax", "onnx-mlp"])
def test_proximal_term_pulls_the_local_model_toward_the_global_one(factory: Any) -> None:
    distances = [_distance_after_training(factory, mu) for mu in (0.0, 0.1, 1.0, 5.0)]
    # measured after real SGD: each larger mu ends strictly closer to the global model
    assert all(a > b for a, b in itertools.pairwise(distances)), distances
    assert distances[-1] < 0.5 * distances[0], distances


def test_the_anchor_is_the_global_model_not_the_local_start() -> None:
    """Training twice in one call chain: the second fit is pulled to the weights it was given."""
    x, y = _skewed_data()
    model = _softmax()
    anchor = model.get_flat()
    far = anchor + np.float32(0.5)
    config = TrainConfig(epochs=8, lr=0.1, batch_size=16, prox_mu=5.0)
    model.set_flat(far)
    model.fit(x, y, config=config, seed=1, global_weights=anchor)
    to_anchor = float(np.linalg.norm(model.get_flat() - anchor))
    model.set_flat(far)
    model.fit(x, y, config=config, seed=1)  # anchor defaults to the start: `far`
    to_far_anchor = float(np.linalg.norm(model.get_flat() - anchor))
    assert to_anchor < to_far_anchor


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"prox_mu": -0.1}, "cannot be negative"),
        ({"prox_mu": MAX_PROX_MU * 2}, f"<= {MAX_PROX_MU:g}"),
        ({"prox_mu": 5.0, "lr": 0.5}, "lr \\* prox_mu must be < 2"),
        ({"prox_mu": float("nan")}, "finite"),
        ({"prox_mu": "0.1"}, "must be a number"),
    ],
)
def test_out_of_bounds_prox_mu_is_refused_on_the_device_and_at_config_load(
    settings: dict[str, Any], reason: str
) -> None:
    trainer = ModelTrainer(_softmax(), *_skewed_data())
    with pytest.raises(RemoteProtocolError, match=reason) as info:
        check_round_training(trainer, settings)
    assert info.value.reason == "bad_train_settings"
    with pytest.raises(ConfigError, match=reason):
        _train_table(AggregatorTable(federation="f", dimension=3, min_clients=1, train=settings))


class _OwnTrainer:
    """A user trainer that knows nothing about FedProx."""

    num_params = 3

    def fit(self, weights: Any, config: Mapping[str, Any], *, seed: int) -> FitResult:
        return FitResult(weights=weights + 0.1, num_examples=1)

    def evaluate(self, weights: Any) -> Any:
        raise NotImplementedError


class _OwnProxTrainer(_OwnTrainer):
    supports_prox_mu = True


def test_a_trainer_that_does_not_apply_fedprox_refuses_the_round() -> None:
    with pytest.raises(RemoteProtocolError, match="supports_prox_mu") as info:
        check_round_training(_OwnTrainer(), {"prox_mu": 0.1, "lr": 0.1})
    assert info.value.reason == "prox_unsupported"
    assert check_round_training(_OwnTrainer(), {"lr": 0.1}).prox_mu == 0.0
    assert check_round_training(_OwnProxTrainer(), {"prox_mu": 0.1}).prox_mu == 0.1
    linear = ModelTrainer(_softmax(), *_skewed_data())
    onnx = ModelTrainer(_onnx(), *_skewed_data())
    for trainer in (linear, onnx):
        assert check_round_training(trainer, {"prox_mu": 0.1, "lr": 0.1}).prox_mu == 0.1


def test_prox_mu_travels_from_the_aggregator_to_the_devices_and_shrinks_the_aggregate() -> None:
    """Through the real round machine: ``train`` carries prox_mu; the devices apply it."""
    base = SimConfig(
        dataset="digits",
        devices=6,
        rounds=2,
        setting="he",
        clip=5.0,
        local_epochs=5,
        lr=0.3,
        min_clients=6,
    )
    norms = {}
    for mu in (0.0, 3.0):
        result = run(SimConfig(**{**_fields(base), "prox_mu": mu}), insecure_seed=1)
        assert result.failed_rounds == 0
        norms[mu] = [float(np.linalg.norm(s / result.scale / 6)) for s in result.sums]
    # the released mean deltas are measurably smaller when the devices are pulled back
    assert all(p < 0.8 * f for p, f in zip(norms[3.0], norms[0.0], strict=True)), norms


def _fields(config: SimConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)


def test_a_device_skips_a_round_announcing_an_unbounded_prox_mu(
    tmp_path: Path,
    keypair: Any,  # noqa: F811
    world: Any,  # noqa: F811
) -> None:
    broker, agg, registry = world
    agent = make_agent(tmp_path, "d0", broker, keypair[0])
    registry.enroll("d0", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(1, dimension=DIM, train=(("lr", 0.1), ("prox_mu", 1e6)))
        wait_for(lambda: any(s.state == "skipped" for s in agg.statuses), what="skip status")
        skipped = [s for s in agg.statuses if s.state == "skipped"]
        assert "bad_train_settings" in skipped[0].detail
        assert agg.updates == [] and agent.ledger.entries == ()  # nothing charged or sent
        # the agent is still running: the next, valid round goes through
        agg.announce(2, dimension=DIM, min_clients=1, train=(("lr", 0.1), ("prox_mu", 0.5)))
        wait_for(lambda: len(agg.updates) == 1, what="an update for round 2")
    finally:
        agent.stop()
