"""The public Trainer protocol: result checks with example messages, exports."""

from __future__ import annotations

import math

import numpy as np
import pytest

import edge_sdk
from edge_sdk.agent import (
    EvaluateResult,
    FitResult,
    ModelTrainer,
    Trainer,
    TrainerContractError,
)
from edge_sdk.agent.trainer import check_evaluate_result, check_fit_result
from edge_sdk.errors import ModelError
from edge_sdk.models import SoftmaxRegression


def _trainer() -> ModelTrainer:
    rng = np.random.default_rng(0)
    return ModelTrainer(
        SoftmaxRegression(4, 3), rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, 20)
    )


def test_model_trainer_implements_the_protocol() -> None:
    t = _trainer()
    assert isinstance(t, Trainer)
    w = np.zeros(t.num_params, dtype=np.float32)
    fit = check_fit_result(t, t.fit(w, {"epochs": 1, "lr": 0.1}, seed=1), t.num_params)
    assert fit.num_examples == 20 and "loss" in fit.metrics
    ev = check_evaluate_result(t, t.evaluate(fit.weights.copy()))
    assert ev.num_examples == 20 and math.isfinite(ev.loss) and "accuracy" in ev.metrics
    assert t.train(w, {"epochs": 1}, seed=1).weights.shape == (t.num_params,)


@pytest.mark.parametrize(
    "result",
    [
        {"weights": np.zeros(15)},
        (np.zeros(15), 20, {}),
        None,
    ],
)
def test_wrong_return_type_shows_an_example(result: object) -> None:
    with pytest.raises(TrainerContractError, match=r"FitResult\(weights=") as info:
        check_fit_result(_trainer(), result, 15)
    assert isinstance(info.value, ModelError)
    assert "ModelTrainer.fit()" in str(info.value)


def test_wrong_length_nan_and_bad_fields() -> None:
    with pytest.raises(TrainerContractError, match="expected num_params = 15"):
        check_fit_result(_trainer(), FitResult(np.zeros(14), 3), 15)
    with pytest.raises(TrainerContractError, match="NaN"):
        FitResult(np.full(15, np.nan), 3)
    with pytest.raises(TrainerContractError, match="1-D"):
        FitResult(np.zeros((3, 5)), 3)
    with pytest.raises(TrainerContractError, match="numpy array"):
        FitResult([0.0] * 15, 3)  # type: ignore[arg-type]
    with pytest.raises(TrainerContractError, match="num_examples"):
        FitResult(np.zeros(15), 0)
    with pytest.raises(TrainerContractError, match="metric 'loss'"):
        FitResult(np.zeros(15), 3, {"loss": float("nan")})
    with pytest.raises(TrainerContractError, match=r"EvaluateResult\(loss="):
        EvaluateResult(float("inf"), 3)
    with pytest.raises(TrainerContractError, match=r"EvaluateResult\(loss="):
        check_evaluate_result(_trainer(), {"loss": 0.1})


def test_exports() -> None:
    assert edge_sdk.Trainer is Trainer
    assert edge_sdk.FitResult is FitResult
    assert edge_sdk.TrainerContractError is TrainerContractError
    from edge_sdk.models import SGDTrainable
    from edge_sdk.models.base import SGDTrainable as Base

    assert SGDTrainable is Base and edge_sdk.SGDTrainable is Base


def test_run_forever_stops_on_the_stop_event(tmp_path: object) -> None:
    import threading
    from pathlib import Path

    from edge_sdk.agent import DeviceAgent, DeviceConfig, transport_config
    from edge_sdk.crypto import generate_keypair, save_public_key
    from edge_sdk.transport import MemoryBroker

    tmp = Path(str(tmp_path))
    pk, _ = generate_keypair(2048)
    save_public_key(pk, tmp / "pk.json", overwrite=True)
    cfg = DeviceConfig(
        device_id="d",
        federation="fed",
        state_dir=tmp / "d",
        broker={"url": "mqtt://memory:1883"},
        public_key=tmp / "pk.json",
    )
    broker = MemoryBroker()
    agent = DeviceAgent(
        cfg, _trainer(), broker.transport("d", will=transport_config(cfg).will), public_key=pk
    )
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert agent.run_forever(stop_event=stop, connect_timeout=5, poll_s=0.05) == 0


def test_load_trainer_from_a_factory_spec() -> None:
    from edge_sdk.agent import load_trainer
    from edge_sdk.errors import ConfigError

    t = load_trainer("tests.test_agent_trainer_api:_trainer", {"model": "x:y"})
    assert isinstance(t, ModelTrainer)
    with pytest.raises(ConfigError, match="cannot import"):
        load_trainer("no_such_module_xyz:make", {})
    with pytest.raises(ConfigError, match="no callable"):
        load_trainer("tests.test_agent_trainer_api:missing", {})
    with pytest.raises(ConfigError, match="does not accept"):
        load_trainer("tests.test_agent_trainer_api:_trainer", {"hidden": 3})
    with pytest.raises(ConfigError, match="not a Trainer"):
        load_trainer("builtins:dict", {})


def test_example_own_numpy_model_federates_a_round(tmp_path: object) -> None:
    import threading
    from pathlib import Path

    from edge_sdk.agent import DeviceAgent, DeviceConfig, load_trainer, transport_config
    from edge_sdk.crypto import generate_keypair, save_public_key
    from edge_sdk.identity import DeviceRegistry
    from edge_sdk.transport import MemoryBroker
    from tests.agent_peer import ScriptedAggregator, wait_for

    tmp = Path(str(tmp_path))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 5))
    np.savez(tmp / "data.npz", x=x, y=x @ np.arange(5.0))
    trainer = load_trainer(
        "examples.own_numpy_model:LeastSquares", {"model": "-", "data": str(tmp / "data.npz")}
    )
    pk, _ = generate_keypair(2048)
    save_public_key(pk, tmp / "pk.json", overwrite=True)
    cfg = DeviceConfig(
        device_id="own",
        federation="fed",
        state_dir=tmp / "own",
        broker={"url": "mqtt://memory:1883"},
        public_key=tmp / "pk.json",
        budget_epsilon=16.0,
    )
    broker = MemoryBroker()
    registry = DeviceRegistry(tmp / "registry.json", "fed")
    agg_t = broker.transport("aggregator")
    agg = ScriptedAggregator(agg_t, federation="fed", public_key=pk, registry=registry)
    agg_t.connect(timeout=5)
    agent = DeviceAgent(
        cfg, trainer, broker.transport("own", will=transport_config(cfg).will), public_key=pk
    )
    registry.enroll("own", agent.identity.public_key_bytes)
    stop = threading.Event()
    runner = threading.Thread(target=lambda: agent.run_forever(stop_event=stop, poll_s=0.05))
    runner.start()
    try:
        agg.publish_model(0, np.zeros(5, dtype=np.float32))
        wait_for(lambda: agent.last_evaluation is not None, what="evaluate on the new model")
        agg.announce(1, dimension=5)
        wait_for(lambda: len(agg.updates) == 1, what="the example's update")
        assert agg.rejected == [] and "loss" in agent.last_metrics
    finally:
        stop.set()
        runner.join(15)
        agg_t.close()
    assert agent.error is None


def test_example_own_numpy_model_is_at_most_25_lines_of_code() -> None:
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "own_numpy_model.py"
    tree = ast.parse(path.read_text())
    docstrings = {
        line
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
        for line in range(node.body[0].lineno, node.body[0].end_lineno + 1)  # type: ignore[operator]
    }
    code = [
        number
        for number, text in enumerate(path.read_text().splitlines(), start=1)
        if text.strip() and not text.strip().startswith("#") and number not in docstrings
    ]
    assert len(code) <= 25, f"{len(code)} lines of code (docstrings and comments not counted)"
