"""Direct fleet simulation: the real device pipeline without a broker.

Every simulated device runs the SDK's own code path (local training with
``edge_sdk.models``, :func:`edge_sdk.pipeline.privatize`: clip, conditional
rounding, exact discrete Gaussian noise, clamp) and the aggregator's own
planning and server optimizer. What is skipped is MQTT, so thousands of
devices fit on a laptop; the full stack over a broker lives in
:mod:`firmware_sim.fleet`.

Settings (``SimConfig.setting``):

* ``float``: plain FedAvg on float deltas (no clipping, quantization, noise).
* ``he``: clipped, quantized, Paillier-encrypted sums; no DP noise.
* ``dp``: ``he`` plus distributed DP noise calibrated to (epsilon, delta)
  over the run's rounds.

With ``crypto=False`` the integer vectors are summed in the clear; with
``crypto=True`` they are packed, encrypted, summed homomorphically and
decrypted with the key holder's key. For one seed both give bit-identical
aggregates (tested): the encryption changes who can see what, not the result.

Simulation randomness is a seeded ChaCha stream per (seed, round, device),
so runs are reproducible. That is a simulation choice: a real device draws
its noise from the OS CSPRNG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.optimizers import make_optimizer, mean_delta
from aggregator.planning import RoundPlan, plan_rounds
from edge_sdk.crypto import (
    CiphertextVector,
    PaillierPrivateKey,
    PaillierPublicKey,
    decrypt,
    encrypt,
    generate_keypair,
    pack,
    sum_ciphertexts,
    unpack_sum,
)
from edge_sdk.models import (
    LinearRegression,
    LogisticRegression,
    Model,
    OnnxModel,
    SoftmaxRegression,
    TrainConfig,
)
from edge_sdk.pipeline import RoundContext, privatize
from edge_sdk.privacy import DPPolicy, epsilon_spent
from edge_sdk.protocol import RoundAnnouncement
from edge_sdk.randomness import DeterministicRandom
from firmware_sim.datasets import Dataset, load_dataset
from firmware_sim.partition import partition

__all__ = [
    "MODELS",
    "SETTINGS",
    "RoundResult",
    "SimConfig",
    "SimResult",
    "build_model",
    "central_baseline",
    "fleet_plan",
    "run",
]

SETTINGS = ("float", "he", "dp")
MODELS = ("softmax", "logistic", "linear", "onnx-mlp", "onnx-cnn")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """One simulation run (see the module docstring for ``setting``)."""

    dataset: str = "digits"
    model: str = "softmax"
    hidden: int = 32
    devices: int = 20
    rounds: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5
    setting: str = "dp"
    epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    crypto: bool = False
    participation: float = 1.0
    dropout: float = 0.0
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.0
    server_opt: str = "fedavg"
    server_lr: float = 1.0
    min_clients: int | None = None
    key_bits: int = 2048
    value_bits: int = 16
    seed: int = 0
    eval_split: str = "test"

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.devices < 1 or self.rounds < 1:
            raise ValueError(f"devices and rounds must be >= 1, got {self.devices}, {self.rounds}")
        if not 0 < self.participation <= 1 or not 0 <= self.dropout < 1:
            raise ValueError("participation must be in (0, 1] and dropout in [0, 1)")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be test or val, got {self.eval_split!r}")

    @property
    def expected_clients(self) -> int:
        """Devices expected to contribute per round (participation and drop-outs)."""
        return max(1, math.floor(self.devices * self.participation * (1 - self.dropout)))


@dataclass(frozen=True, slots=True)
class RoundResult:
    """Figures of one round."""

    round: int
    contributors: int
    accuracy: float
    loss: float
    epsilon: float
    bytes_up: int
    seconds: float
    clamped: int


@dataclass(slots=True)
class SimResult:
    """A whole run: config, per-round figures and the final aggregate digest."""

    config: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    sums: list[npt.NDArray[np.int64]] = field(default_factory=list)
    scale: float = 0.0
    noise_sigma: float = 0.0
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """Accuracy (or negative RMSE for regression) after the last round."""
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "config": self.config,
            "final_accuracy": self.final_accuracy,
            "epsilon": self.rounds[-1].epsilon if self.rounds else 0.0,
            "scale": self.scale,
            "noise_sigma": self.noise_sigma,
            "seconds": round(self.seconds, 3),
            "rounds": [asdict(r) for r in self.rounds],
        }


def fleet_plan(
    public_key: PaillierPublicKey,
    *,
    dimension: int,
    devices: int,
    min_clients: int,
    clip: float,
    dp: bool,
    epsilon: float,
    delta: float,
    rounds: int,
    value_bits: int = 16,
) -> RoundPlan:
    """The aggregator's round plan for a simulated fleet (distributed DP or HE-only)."""
    policy = None
    if dp:
        policy = DPPolicy(
            mode="distributed",
            epsilon=epsilon,
            delta=delta,
            rounds=rounds,
            clip=clip,
            min_clients=min_clients,
        )
    return plan_rounds(
        public_key,
        dimension=dimension,
        max_contributors=max(devices, 2),
        min_clients=min_clients,
        clip=clip,
        value_bits=value_bits,
        policy=policy,
    )


def build_model(config: SimConfig, data: Dataset) -> Model:
    """The model named by ``config`` for ``data``."""
    if config.model == "softmax":
        return SoftmaxRegression(data.n_features, max(data.n_classes, 2))
    if config.model == "logistic":
        return LogisticRegression(data.n_features)
    if config.model == "linear":
        return LinearRegression(data.n_features)
    from edge_sdk.models import zoo

    if config.model == "onnx-mlp":
        proto = zoo.mlp(data.n_features, config.hidden, max(data.n_classes, 2), seed=config.seed)
        return OnnxModel(proto)
    if data.n_features != 64:
        raise ValueError("onnx-cnn needs 8x8 images (the digits dataset)")
    return OnnxModel(zoo.digits_cnn(seed=config.seed))


def _metric(model: Model, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> tuple[float, float]:
    metrics = model.evaluate(x, y)
    if "accuracy" in metrics:
        return float(metrics["accuracy"]), float(metrics["loss"])
    return -float(metrics.get("rmse", math.sqrt(metrics["loss"]))), float(metrics["loss"])


def _labels(data: Dataset) -> npt.NDArray[Any]:
    if data.task == "classification":
        labels: npt.NDArray[Any] = data.y_train
        return labels
    bins: npt.NDArray[Any] = np.digitize(data.y_train, np.quantile(data.y_train, [0.25, 0.5, 0.75]))
    return bins


def _announcement(plan: RoundPlan, round_id: int) -> RoundAnnouncement:
    return RoundAnnouncement(
        federation="sim",
        round_id=round_id,
        model_version=round_id - 1,
        model_digest=b"\0" * 32,
        issued_ms=0,
        deadline_ms=0,
        min_clients=plan.min_clients,
        max_contributors=plan.max_contributors,
        key_fingerprint=bytes.fromhex(plan.public_key.fingerprint),
        packing=plan.packing.to_bytes(),
        packing_digest=plan.packing.digest(),
        privacy=plan.privacy_field,
    )


def run(
    config: SimConfig,
    *,
    data: Dataset | None = None,
    keys: tuple[PaillierPublicKey, PaillierPrivateKey] | None = None,
    progress: Callable[[RoundResult], None] | None = None,
) -> SimResult:
    """Run a simulation and return its per-round figures.

    Args:
        config: the run.
        data: a preloaded dataset (else ``load_dataset(config.dataset)``).
        keys: a Paillier key pair to reuse (else generated when needed).
        progress: called after every round.
    """
    started = time.perf_counter()
    data = data or load_dataset(config.dataset, seed=config.seed)
    shards = partition(
        _labels(data),
        config.devices,
        scheme=config.partition,
        alpha=config.alpha,
        seed=config.seed,
    )
    model = build_model(config, data)
    weights = model.get_flat().astype(np.float64)
    dim = int(weights.size)
    optimizer = make_optimizer({"name": config.server_opt, "lr": config.server_lr})
    train = TrainConfig(
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
    )
    result = SimResult(config=asdict(config))
    plan: RoundPlan | None = None
    if config.setting != "float":
        if keys is None:
            keys = generate_keypair(config.key_bits)
        plan = fleet_plan(
            keys[0],
            dimension=dim,
            devices=config.devices,
            min_clients=config.min_clients or max(1, config.expected_clients // 2),
            clip=config.clip,
            dp=config.setting == "dp",
            epsilon=config.epsilon,
            delta=config.delta,
            rounds=config.rounds,
            value_bits=config.value_bits,
        )
        result.scale = plan.packing.scale
        result.noise_sigma = 0.0 if plan.noise is None else plan.noise.sigma / plan.packing.scale
    select_rng = np.random.default_rng(config.seed + 1)
    x_eval, y_eval = (
        (data.x_test, data.y_test) if config.eval_split == "test" else (data.x_val, data.y_val)
    )
    for round_id in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        chosen = np.flatnonzero(select_rng.random(config.devices) < config.participation)
        survivors = [int(d) for d in chosen if select_rng.random() >= config.dropout]
        ctx = (
            None
            if plan is None
            else RoundContext.from_announcement(_announcement(plan, round_id), plan.public_key)
        )
        float_sum = np.zeros(dim)
        int_vectors: list[npt.NDArray[np.int64]] = []
        clamped = 0
        for device in survivors:
            idx = shards[device]
            model.set_flat(weights.astype(np.float32))
            model.fit(
                data.x_train[idx],
                data.y_train[idx],
                config=train,
                seed=config.seed * 100_003 + round_id * 1009 + device,
            )
            delta = model.get_flat().astype(np.float64) - weights
            if ctx is None:
                float_sum += delta
                continue
            private = privatize(
                delta,
                ctx,
                clip=config.clip,
                rng=DeterministicRandom(f"{config.seed}/{round_id}/{device}"),
                allow_insecure_rng=True,
            )
            clamped += private.clamped
            int_vectors.append(private.values)
        count = len(survivors)
        bytes_up = 0
        if count and ctx is not None and plan is not None:
            if config.crypto:
                assert keys is not None
                vectors = []
                for device, ints in zip(survivors, int_vectors, strict=True):
                    rng = DeterministicRandom(f"{config.seed}/{round_id}/{device}/enc")
                    vectors.append(encrypt(keys[0], pack(ints, plan.packing), rng=rng))
                bytes_up = sum(len(v.to_bytes()) for v in vectors)
                blob = sum_ciphertexts(keys[0], vectors).to_bytes()
                total = CiphertextVector.from_bytes(blob, keys[0], plan.num_ciphertexts)
                sums = unpack_sum(decrypt(keys[1], total), plan.packing, count=count, length=dim)
            else:
                sums = np.sum(np.stack(int_vectors), axis=0, dtype=np.int64)
                assert keys is not None
                bytes_up = count * plan.num_ciphertexts * keys[0].ciphertext_bytes
            result.sums.append(sums)
            mean = mean_delta(sums, scale=plan.packing.scale, count=count)
            weights = optimizer.step(weights, mean)
        elif count:
            weights = optimizer.step(weights, float_sum / count)
            bytes_up = count * dim * 4
        model.set_flat(weights.astype(np.float32))
        accuracy, loss = _metric(model, x_eval, y_eval)
        eps = 0.0
        if plan is not None and plan.noise is not None:
            eps = epsilon_spent(plan.noise, round_id)
        entry = RoundResult(
            round=round_id,
            contributors=count,
            accuracy=accuracy,
            loss=loss,
            epsilon=eps,
            bytes_up=int(bytes_up),
            seconds=time.perf_counter() - t0,
            clamped=clamped,
        )
        result.rounds.append(entry)
        if progress is not None:
            progress(entry)
    result.seconds = time.perf_counter() - started
    return result


def central_baseline(
    config: SimConfig, *, data: Dataset | None = None, epochs: int | None = None
) -> float:
    """Accuracy of the same model trained centrally on all training data."""
    data = data or load_dataset(config.dataset, seed=config.seed)
    model = build_model(config, data)
    model.fit(
        data.x_train,
        data.y_train,
        config=TrainConfig(
            epochs=epochs or max(config.rounds * config.local_epochs, 1),
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
        ),
        seed=config.seed,
    )
    x_eval, y_eval = (
        (data.x_test, data.y_test) if config.eval_split == "test" else (data.x_val, data.y_val)
    )
    return _metric(model, x_eval, y_eval)[0]
