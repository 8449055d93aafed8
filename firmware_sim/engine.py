"""Direct fleet simulation: the product's round machine, key holder and device code in memory.

Nothing here decides anything about a round. The aggregator side is the real
sans-io :class:`aggregator.rounds.RoundMachine` (validation, quorum,
deadline, close, ``mean_delta``, the server optimizer) and the real
:class:`aggregator.keyholder.KeyHolder` (quorum of signed contributor proofs,
witness mode with the devices' own ciphertext blobs, one sum per round). The
device side is the real sans-io :class:`edge_sdk.agent.session.DeviceSession`
per device, driven the way :class:`edge_sdk.agent.DeviceAgent` drives it:
train on the announced settings, :func:`edge_sdk.pipeline.build_update`
(clip, conditional rounding, exact discrete Gaussian noise, clamp, pack,
Paillier encrypt, Ed25519 sign), charge the device's own
:class:`~edge_sdk.privacy.PrivacyLedger` before the update leaves, chunk it
like the agent and publish. This module only moves bytes between them and
keeps a virtual clock; what is skipped is MQTT, threads and durable storage,
so thousands of devices fit on a laptop. The full stack over a broker lives
in :mod:`firmware_sim.fleet`.

Settings (``SimConfig.setting``):

* ``float``: FedAvg without clipping or noise. The deltas travel through the
  same machine as 48-bit fixed point (clip ``FLOAT_CLIP``, which never binds
  on a converging run, resolution ``FLOAT_CLIP / 2^47``, far below float32
  precision): a float baseline that is still decided by the round machine.
* ``he``: clipped, 16-bit quantized, Paillier-encrypted sums; no DP noise.
* ``dp``: ``he`` plus distributed DP noise calibrated to (epsilon, delta)
  over the run's rounds.
* ``dp_adaptive``: ``dp`` with adaptive clipping (Andrew et al. 2021): no
  hand-tuned clip; it starts at ``adaptive_initial_clip`` and follows the
  ``adaptive_quantile`` of the devices' update norms from their noised
  clipped-or-not bits (``clip`` is ignored).

Crypto. ``crypto=True`` encrypts with fresh obfuscators (``r^n``, the
costly part). ``crypto=False`` is the fast path: the same code with the
obfuscator fixed to 1, so a ciphertext is ``1 + n*m mod n^2``: a valid
Paillier ciphertext of the same plaintext, summed by the machine's real
modular multiplication and decrypted by the real key holder, but NOT
hiding (anyone reads ``m = (c - 1) / n``). Both paths take the same round
decisions; for the same randomness they give bit-identical aggregates
(tested). Outputs say which (``"crypto": "paillier"`` or ``"unblinded"``).

Time is virtual. Every round a ``participation`` share of the devices is
online and receives the announcement; a ``dropout`` share of those trains,
charges its ledger and uploads only after the deadline (the machine answers
``late``). The machine's deadline and quorum decide: a round below
``min_clients`` fails (``failed: quorum``) exactly as in the service, and the
run stops after ``rounds`` rounds, successful or not. The epsilon reported is
the largest one any device's own ledger has charged.

Randomness. Rounding, noise and obfuscators come from the OS CSPRNG, as on a
device. ``run(..., insecure_seed=N)`` is the test seam: a seeded ChaCha
stream per (seed, round, device), labelled ``"randomness":
"seeded-insecure"`` in the results. ``SimConfig.seed`` fixes only the
simulation's own choices (partition, who is online, local SGD order).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator import rounds as agg
from aggregator.keyholder import exchange
from aggregator.optimizers import make_optimizer
from aggregator.planning import AdaptiveClipPlan, EvaluationPlan, RoundPlan, plan_rounds
from edge_sdk.agent import session as dev
from edge_sdk.agent.trainer import ModelTrainer, check_round_training
from edge_sdk.crypto import (
    ObfuscatorPool,
    PaillierPublicKey,
)
from edge_sdk.errors import BudgetExhaustedError, EdgeFLError, RemoteProtocolError
from edge_sdk.extras import EVAL_CORRECT, EVAL_EXAMPLES, evaluation_values, per_example_results
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.models import (
    LinearRegression,
    LogisticRegression,
    Model,
    OnnxModel,
    SoftmaxRegression,
    TrainConfig,
)
from edge_sdk.pipeline import RoundContext, build_update
from edge_sdk.privacy import DPPolicy, PrivacyLedger, update_digest
from edge_sdk.protocol import (
    Chunk,
    GlobalModel,
    KeyholderRequest,
    KeyholderResult,
    Reassembler,
    RoundAnnouncement,
    Topics,
    parse_topic,
    split_payload,
)
from edge_sdk.protocol.limits import MAX_MODEL_BYTES
from edge_sdk.randomness import DeterministicRandom, RandomSource
from firmware_sim.committee import InMemoryCommittee
from firmware_sim.datasets import Dataset, load_dataset
from firmware_sim.partition import partition

__all__ = [
    "FLOAT_CLIP",
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

SETTINGS = ("float", "he", "dp", "dp_adaptive")
MODELS = ("softmax", "logistic", "linear", "onnx-mlp", "onnx-cnn")

#: L2 clip of the ``float`` setting (never reached by a converging run).
FLOAT_CLIP = 1e4
#: Slot value bits of the ``float`` setting (the packing maximum).
FLOAT_VALUE_BITS = 48
FEDERATION = "sim"
#: Virtual round deadline (the clock is simulated; only the order matters).
ROUND_DURATION_MS = 60_000
_EPOCH_MS = 1_700_000_000_000


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
    prox_mu: float = 0.0
    server_opt: str = "fedavg"
    server_lr: float = 1.0
    min_clients: int | None = None
    key_bits: int = 2048
    value_bits: int = 16
    seed: int = 0
    eval_split: str = "test"
    #: Federated evaluation every this many rounds (0: off). Each device
    #: evaluates the received model on its share of the validation split
    #: (its local held-out data) and sends (examples, correct, loss) in the
    #: update's extra slots; the reported test accuracy stays the central one.
    evaluate_every: int = 0
    #: Noise multiplier of the evaluation slots (sum noise / slot bound).
    eval_noise: float = 5.0
    #: Most held-out examples one device counts.
    eval_max_examples: int = 16
    #: dp_adaptive: target quantile, geometric step, first clip, bit noise
    #: (standard deviation of the released count in bits; None: expected
    #: contributors / 10, raised until the bit costs at most ~5% of the budget).
    adaptive_quantile: float = 0.5
    adaptive_lr: float = 0.2
    adaptive_initial_clip: float = 0.1
    adaptive_bit_noise: float | None = None

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
        if self.min_clients is not None and not 1 <= self.min_clients <= self.devices:
            raise ValueError(f"min_clients must be in [1, devices], got {self.min_clients}")
        if self.evaluate_every < 0 or self.eval_max_examples < 1 or not self.eval_noise > 0:
            raise ValueError("evaluate_every must be >= 0, eval_max_examples >= 1, eval_noise > 0")
        # the local training settings, checked as [aggregator.train] is
        TrainConfig(lr=self.lr, momentum=self.momentum, prox_mu=self.prox_mu)

    @property
    def expected_clients(self) -> int:
        """Devices expected to contribute per round (participation and drop-outs)."""
        return max(1, math.floor(self.devices * self.participation * (1 - self.dropout)))

    @property
    def quorum(self) -> int:
        """``min_clients``, by default half the expected contributors."""
        return self.min_clients or max(1, self.expected_clients // 2)


@dataclass(frozen=True, slots=True)
class RoundResult:
    """Figures of one round, as the round machine ended it.

    Attributes:
        round: the round id.
        contributors: updates in the sum when the round closed (or failed).
        accuracy: accuracy (negative RMSE for regression) of the model after it.
        loss: loss of the model after it.
        epsilon: the largest epsilon any device's ledger has charged so far.
        bytes_up: bytes of the update chunks the devices published for it.
        seconds: wall time of the round.
        clamped: coordinates changed by the devices' final clamp.
        outcome: ``ok`` or ``failed: <reason>`` (the machine's record).
        late: updates that reached the aggregator after the round closed.
        clipped: updates whose L2 norm was clipped.
        fed_accuracy: federated accuracy of the model the devices received
            this round, from the decrypted noised totals (None: no evaluation).
        fed_loss: federated mean loss, likewise.
        fed_examples: noised count of held-out examples evaluated.
        fed_plain_accuracy: the same accuracy from the devices' own un-noised
            bounded counts (simulation only: what the DP noise moved).
        fed_plain_examples: the devices' own un-noised example count.
        clip: the L2 clip the round announced.
    """

    round: int
    contributors: int
    accuracy: float
    loss: float
    epsilon: float
    bytes_up: int
    seconds: float
    clamped: int
    outcome: str = "ok"
    late: int = 0
    clipped: int = 0
    fed_accuracy: float | None = None
    fed_loss: float | None = None
    fed_examples: float | None = None
    fed_plain_accuracy: float | None = None
    fed_plain_examples: int | None = None
    clip: float | None = None


@dataclass(slots=True)
class SimResult:
    """A whole run: config, per-round figures and the applied aggregates."""

    config: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    sums: list[npt.NDArray[np.int64]] = field(default_factory=list)
    scale: float = 0.0
    noise_sigma: float = 0.0
    seconds: float = 0.0
    randomness: str = "os-csprng"
    crypto: str = "unblinded"
    stats: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        """Accuracy (or negative RMSE for regression) after the last round."""
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    @property
    def failed_rounds(self) -> int:
        """Rounds the machine failed (quorum, key holder refusal, ...)."""
        return sum(1 for r in self.rounds if r.outcome != "ok")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "config": self.config,
            "final_accuracy": self.final_accuracy,
            "epsilon": self.rounds[-1].epsilon if self.rounds else 0.0,
            "scale": self.scale,
            "noise_sigma": self.noise_sigma,
            "seconds": round(self.seconds, 3),
            "randomness": self.randomness,
            "crypto": self.crypto,
            "rounds_failed": self.failed_rounds,
            "stats": self.stats,
            "rejections": self.rejections,
            "alerts": self.alerts,
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
    evaluation: EvaluationPlan | None = None,
    adaptive: AdaptiveClipPlan | None = None,
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
        evaluation=evaluation,
        adaptive=adaptive,
    )


def _default_bit_noise(config: SimConfig) -> float:
    """sigma_b for ``dp_adaptive``: expected contributors / 10, raised so the bit costs little.

    The bit's releases are ``rounds / (8 sigma_b^2)``-zCDP; sigma_b is raised
    until that is at most 1/20 of the zCDP budget ``rho`` of the target
    epsilon (``epsilon = rho + 2 sqrt(rho ln(1/delta))``), so adaptive
    clipping takes at most about 5% of the budget from the model noise.
    """
    log_term = math.sqrt(math.log(1.0 / config.delta))
    rho = (math.sqrt(log_term**2 + config.epsilon) - log_term) ** 2
    floor = math.sqrt(20.0 * config.rounds / (8.0 * rho))
    return max(config.expected_clients / 10.0, floor)


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


class _UnitObfuscators(ObfuscatorPool):
    """The ``crypto=False`` stand-in for the obfuscator pool: every ``r^n`` is 1.

    :func:`edge_sdk.crypto.encrypt` then yields ``1 + n*m mod n^2``: the
    ciphertext format, validation, homomorphic sum and decryption are all
    real, only the blinding (and its cost) is gone.
    """

    def __init__(self, public_key: PaillierPublicKey) -> None:
        """Wrap ``public_key`` (no directory, nothing stored)."""
        self.public_key = public_key
        self.taken_from_pool = 0
        self.computed_on_demand = 0

    def take_many(self, count: int, *, rng: RandomSource | None = None) -> list[Any]:
        """``count`` unit obfuscators."""
        self.taken_from_pool += count
        return [1] * count


@dataclass(slots=True)
class _Device:
    """One simulated device: identity, session, trainer, ledger and held model."""

    device_id: str
    index: int
    identity: DeviceIdentity
    session: dev.DeviceSession
    trainer: ModelTrainer
    ledger: PrivacyLedger | None
    weights: npt.NDArray[np.float32] | None = None
    held_out: tuple[npt.NDArray[Any], npt.NDArray[Any]] | None = None


@dataclass(slots=True)
class _RoundTally:
    """What the devices did in the current round (figures only, no decisions)."""

    bytes_up: int = 0
    clamped: int = 0
    clipped: int = 0
    late: int = 0
    blobs: dict[str, bytes] = field(default_factory=dict)
    extras: dict[str, dict[str, int]] = field(default_factory=dict)


class _Simulation:
    """Wires the round machine, the key holder and the device sessions in memory."""

    def __init__(
        self,
        config: SimConfig,
        data: Dataset,
        keys: InMemoryCommittee,
        workdir: Path,
        insecure_seed: int | None,
    ) -> None:
        self.config = config
        self.data = data
        self.insecure_seed = insecure_seed
        self.public_key = keys.public_key
        self.now = _EPOCH_MS
        self.topics = Topics(FEDERATION)
        self.model = build_model(config, data)
        weights = self.model.get_flat().astype(np.float32)
        quorum = config.quorum
        dp = config.setting in ("dp", "dp_adaptive")
        is_float = config.setting == "float"
        adaptive = None
        if config.setting == "dp_adaptive":
            adaptive = AdaptiveClipPlan(
                target_quantile=config.adaptive_quantile,
                lr=config.adaptive_lr,
                initial_clip=config.adaptive_initial_clip,
                bit_noise=config.adaptive_bit_noise or _default_bit_noise(config),
            )
        self.plan = fleet_plan(
            keys.public_key,
            dimension=int(weights.size),
            devices=config.devices,
            min_clients=quorum,
            clip=(
                FLOAT_CLIP
                if is_float
                else config.clip
                if adaptive is None
                else adaptive.initial_clip
            ),
            dp=dp,
            epsilon=config.epsilon,
            delta=config.delta,
            rounds=config.rounds,
            value_bits=FLOAT_VALUE_BITS if is_float else config.value_bits,
            evaluation=(
                EvaluationPlan(
                    every=config.evaluate_every,
                    noise_multiplier=config.eval_noise,
                    max_examples=config.eval_max_examples,
                )
                if config.evaluate_every
                else None
            ),
            adaptive=adaptive,
        )
        self.pool = None if config.crypto else _UnitObfuscators(keys.public_key)
        self.require_privacy = dp
        registry = DeviceRegistry(workdir / "registry.json", FEDERATION)
        shards = partition(
            _labels(data),
            config.devices,
            scheme=config.partition,
            alpha=config.alpha,
            seed=config.seed,
        )
        self.devices: dict[str, _Device] = {}
        # each device's local held-out data: an even share of the validation split
        held_out = np.array_split(
            np.random.default_rng(config.seed + 7).permutation(len(data.y_val)), config.devices
        )
        for index, idx in enumerate(shards):
            device_id = f"dev-{index:04d}"
            identity = DeviceIdentity.generate(device_id)
            registry.enroll(device_id, identity.public_key_bytes, now_ms=self.now)
            session = dev.DeviceSession(device_id=device_id, federation=FEDERATION)
            session.handle(dev.Started(now_ms=self.now, model_version=None))
            session.handle(dev.Connected(now_ms=self.now))
            ledger = None
            if dp:
                ledger = PrivacyLedger(
                    workdir / f"{device_id}.ledger.json",
                    budget_epsilon=config.epsilon * 1.0001,
                    delta=config.delta,
                    clock=lambda: self.now / 1000,
                )
            self.devices[device_id] = _Device(
                device_id=device_id,
                index=index,
                identity=identity,
                session=session,
                trainer=ModelTrainer(self.model, data.x_train[idx], data.y_train[idx]),
                ledger=ledger,
                held_out=(data.x_val[held_out[index]], data.y_val[held_out[index]]),
            )
        round_config = agg.RoundConfig(
            federation=FEDERATION,
            min_clients=quorum,
            target_clients=config.devices,
            round_duration_ms=ROUND_DURATION_MS,
            rounds=config.rounds,
            train=(
                ("batch_size", config.batch_size),
                ("epochs", config.local_epochs),
                ("lr", config.lr),
                ("momentum", config.momentum),
                # FedProx only when asked for: other runs' announcements stay as they were
                *((("prox_mu", config.prox_mu),) if config.prox_mu > 0 else ()),
            ),
        )
        # The committee's members witness every update as a broker would
        # deliver it (see upload) and check each request on their own.
        self.keyholders = keys.members(registry, min_clients=quorum, clock=lambda: self.now)
        self.machine = agg.RoundMachine(
            round_config,
            self.plan,
            registry,
            make_optimizer({"name": config.server_opt, "lr": config.server_lr}),
            initial_weights=weights,
            committee=keys.verifier(),
            identity=DeviceIdentity.generate("aggregator"),
        )
        self.retained_model: GlobalModel | None = None
        self.retained_round: RoundAnnouncement | None = None
        self._model_chunks = Reassembler(max_payload_size=MAX_MODEL_BYTES, max_pending=4)
        self.closed: dict[int, agg.RoundRecord] = {}
        self.applied: dict[int, bytes] = {}
        self.epsilon = 0.0
        self.tally = _RoundTally()
        self.late_mail: list[tuple[str, bytes]] = []
        self.stragglers: set[str] = set()
        self.alerts: list[str] = []
        self.round_clip = self.machine.clip

    # -- aggregator side: feed the machine, execute its actions ---------------

    def feed(self, event: agg.Event) -> None:
        """One event through the round machine; its actions executed in order."""
        for action in self.machine.handle(event):
            if isinstance(action, agg.Publish):
                self._retain(action)
            elif isinstance(action, agg.SendReceipt):
                receipt = action.receipt
                self.to_device(
                    self.devices[receipt.device_id],
                    dev.ReceiptReceived(now_ms=self.now, receipt=receipt),
                )
            elif isinstance(action, agg.RequestDecryption):
                for result in self._decrypt(action.request):
                    self.feed(agg.KeyholderAnswered(result=result, now_ms=self.now))
            elif isinstance(action, agg.Commit):
                for record in action.records:
                    if record.phase in ("done", "failed"):
                        self.closed[record.round_id] = record
                    if record.phase == "done":
                        released = agg.round_outcome(record.result)[1]
                        if released is not None:
                            self.applied[record.round_id] = released.tobytes()
            elif isinstance(action, agg.Alert):
                self.alerts.append(f"round {action.round_id}: {action.kind} {action.detail}")
            # PersistAccepted: no store (the machine keeps the running sum).
            # Rejected: the machine counts reasons in ``machine.rejections``.

    def _decrypt(self, request: KeyholderRequest) -> list[KeyholderResult]:
        """Route a decryption request to the key holder(s); their answers, in order.

        The one place that knows who decrypts: every member of the in-memory
        T-of-N committee answers with its share (or a refusal); the round
        machine verifies and combines them.
        """
        return exchange(self.keyholders, request)

    def _retain(self, action: agg.Publish) -> None:
        parsed = parse_topic(action.topic)
        kind = None if parsed is None else parsed.kind
        if kind == "round":
            self.retained_round = RoundAnnouncement.from_bytes(action.payload)
        elif kind == "model":
            whole = self._model_chunks.add(Chunk.from_bytes(action.payload))
            if whole is not None:
                self.retained_model = GlobalModel.from_bytes(whole)

    def upload(self, device_id: str, payload: bytes) -> None:
        """One update chunk from a device reaches the aggregator (and every member)."""
        topic = self.topics.updates(device_id)
        for member in self.keyholders:
            member.witness(topic, payload)
        self.feed(
            agg.MessageReceived(
                topic=self.topics.updates(device_id), payload=payload, now_ms=self.now
            )
        )

    # -- device side: the session, driven like the agent ------------------------

    def to_device(self, device: _Device, event: dev.Event) -> None:
        """Feed one event to a device's session and run what it asks for."""
        pending: list[dev.Event] = [event]
        while pending:
            for action in device.session.handle(pending.pop(0)):
                follow_up = self._device_action(device, action)
                if follow_up is not None:
                    pending.append(follow_up)

    def _device_action(self, device: _Device, action: dev.Action) -> dev.Event | None:
        if isinstance(action, dev.PrepareUpdate):
            return self._prepare(device, action.announcement)
        if isinstance(action, dev.PublishUpdate):
            self._publish(device, action.entry)
        elif isinstance(action, dev.ApplyModel):
            device.weights = np.frombuffer(action.model.weights, dtype="<f4")
        # ClearOutbox: the outbox is the session's; PublishStatus: nobody listens.
        return None

    def _rng(self, device: _Device, round_id: int) -> RandomSource | None:
        if self.insecure_seed is None:
            return None  # the pipeline's default: the OS CSPRNG
        return DeterministicRandom(f"{self.insecure_seed}/{round_id}/{device.index}")

    def _prepare(self, device: _Device, ann: RoundAnnouncement) -> dev.Event:
        """The agent's order: check the ledger, train, privatize and seal, charge, store."""

        def fail(reason: str, detail: str = "") -> dev.UpdateFailed:
            return dev.UpdateFailed(
                now_ms=self.now, round_id=ann.round_id, reason=reason, detail=detail
            )

        try:
            ctx = RoundContext.from_announcement(ann, self.public_key)
        except RemoteProtocolError as exc:
            return fail(exc.reason, str(exc))
        ledger = device.ledger
        if ledger is not None and ledger.has_spent(ctx.round_key):
            return fail("already_spent")
        if ctx.noise is None and self.require_privacy:
            return fail("no_privacy")
        cost = ctx.cost
        if cost is not None:
            if ledger is None:
                return fail("no_ledger")
            try:
                ledger.check(cost)
            except BudgetExhaustedError as exc:
                return fail("budget_exhausted", str(exc))
        if device.weights is None:
            return fail("no_model")
        extras = None
        if ctx.evaluate and device.held_out is not None:
            # the received global model on the device's own held-out data
            self.model.set_flat(device.weights.astype(np.float32).copy())
            correct, losses = per_example_results(self.model, *device.held_out)
            extras = evaluation_values(correct, losses, ctx.packing)
        train = ann.train_config()
        try:  # as the agent: the announced training settings, checked before training
            check_round_training(device.trainer, train)
        except RemoteProtocolError as exc:
            return fail(exc.reason, str(exc))
        seed = self.config.seed * 100_003 + ann.round_id * 1009 + device.index
        trained = device.trainer.train(device.weights.copy(), train, seed=seed)
        delta = trained.weights.astype(np.float64) - device.weights.astype(np.float64)
        clip = train.get("clip") if ctx.noise is None else None
        rng = self._rng(device, ann.round_id)
        try:
            update, private = build_update(
                delta,
                ctx,
                device.identity,
                pool=self.pool,
                clip=float(clip) if isinstance(clip, (int, float)) else None,
                extras=extras,
                rng=rng,
                allow_insecure_rng=rng is not None,
                now_ms=self.now,
            )
        except (ValueError, EdgeFLError) as exc:
            return fail("privatize_failed", str(exc))
        payload = update.to_bytes()
        if cost is not None and ledger is not None and ctx.noise is not None:
            entry = ledger.record(
                ctx.round_key,
                cost,
                idempotency_key=update_digest(payload),
                federation=ann.federation,
                round_id=ann.round_id,
                noise=ctx.noise.to_dict(),
            )
            self.epsilon = max(self.epsilon, entry.epsilon_after)
        self.tally.clamped += private.clamped
        self.tally.clipped += int(private.clipped)
        self.tally.extras[device.device_id] = dict(private.extras)
        self.tally.blobs[device.device_id] = update.ciphertexts
        outbox = dev.OutboxEntry(
            round_id=update.round_id, update_digest=update.update_digest, payload=payload
        )
        return dev.UpdateReady(now_ms=self.now, entry=outbox)

    def _publish(self, device: _Device, entry: dev.OutboxEntry) -> None:
        """Chunk the stored envelope as the agent does; stragglers' chunks arrive late."""
        chunks = split_payload(
            entry.payload,
            federation=FEDERATION,
            stream="update",
            sender=device.device_id,
            round_id=entry.round_id,
            max_message_size=self.machine.config.max_message_size,
        )
        for chunk in chunks:
            payload = chunk.to_bytes()
            self.tally.bytes_up += len(payload)
            if device.device_id in self.stragglers:
                self.late_mail.append((device.device_id, payload))
            else:
                self.upload(device.device_id, payload)

    # -- the run ------------------------------------------------------------------

    def run(self, progress: Callable[[RoundResult], None] | None) -> list[RoundResult]:
        """Rounds until the machine finishes or ``config.rounds`` rounds were opened."""
        cfg = self.config
        select_rng = np.random.default_rng(cfg.seed + 1)
        x_eval, y_eval = (
            (self.data.x_test, self.data.y_test)
            if cfg.eval_split == "test"
            else (self.data.x_val, self.data.y_val)
        )
        results: list[RoundResult] = []
        self.feed(agg.Start(now_ms=self.now))
        while not self.machine.finished and self.machine.round_id <= cfg.rounds:
            t0 = time.perf_counter()
            round_id = self.machine.round_id
            ann, model = self.retained_round, self.retained_model
            assert ann is not None and model is not None and ann.round_id == round_id
            self.round_clip = self.machine.clip
            ids = sorted(self.devices)
            online = [
                ids[i] for i in np.flatnonzero(select_rng.random(cfg.devices) < cfg.participation)
            ]
            self.stragglers = {d for d in online if select_rng.random() < cfg.dropout}
            self.tally = _RoundTally()
            self.late_mail = []
            self.now = max(self.now, ann.issued_ms) + 1
            for device_id in online:  # what a (re)connecting device gets: the retained pair
                device = self.devices[device_id]
                self.to_device(device, dev.ModelReceived(now_ms=self.now, model=model))
                self.to_device(device, dev.RoundReceived(now_ms=self.now, announcement=ann))
            if self.machine.round_id == round_id and self.machine.phase == "collecting":
                self.now = max(self.now, ann.deadline_ms)
                self.feed(agg.Tick(now_ms=self.now))
            self.now += 1
            late_before = self.machine.stats["late"]
            for device_id, payload in self.late_mail:
                self.upload(device_id, payload)
            late = self.machine.stats["late"] - late_before
            results.append(self._figures(round_id, x_eval, y_eval, t0, late))
            if progress is not None:
                progress(results[-1])
        return results

    def _figures(
        self,
        round_id: int,
        x_eval: npt.NDArray[Any],
        y_eval: npt.NDArray[Any],
        t0: float,
        late: int,
    ) -> RoundResult:
        record = self.closed.get(round_id)
        if record is None:
            raise RuntimeError(f"round {round_id} neither finished nor failed")
        model = self.machine.model
        assert model is not None
        self.model.set_flat(np.frombuffer(model.weights, dtype="<f4").copy())
        accuracy, loss = _metric(self.model, x_eval, y_eval)
        fed = agg.round_metrics(record)
        plain = None
        on_time = [v for d, v in self.tally.extras.items() if d not in self.stragglers]
        examples = sum(v.get(EVAL_EXAMPLES, 0) for v in on_time)
        if examples:
            plain = sum(v.get(EVAL_CORRECT, 0) for v in on_time) / examples
        return RoundResult(
            round=round_id,
            contributors=record.count,
            accuracy=accuracy,
            loss=loss,
            epsilon=self.epsilon,
            bytes_up=self.tally.bytes_up,
            seconds=time.perf_counter() - t0,
            clamped=self.tally.clamped,
            outcome="ok" if record.phase == "done" else f"failed: {record.outcome}",
            late=late,
            clipped=self.tally.clipped,
            fed_accuracy=None if fed is None else fed.accuracy,
            fed_loss=None if fed is None else fed.loss,
            fed_examples=None if fed is None else fed.examples,
            fed_plain_accuracy=plain if fed is not None and fed.accuracy is not None else None,
            fed_plain_examples=examples if fed is not None and fed.examples is not None else None,
            clip=self.round_clip,
        )


def run(
    config: SimConfig,
    *,
    data: Dataset | None = None,
    keys: InMemoryCommittee | None = None,
    progress: Callable[[RoundResult], None] | None = None,
    insecure_seed: int | None = None,
) -> SimResult:
    """Run a simulation and return its per-round figures.

    Args:
        config: the run.
        data: a preloaded dataset (else ``load_dataset(config.dataset)``).
        keys: a key-holder committee to reuse (else a 2-of-3 ceremony of
            ``config.key_bits``).
        progress: called after every round.
        insecure_seed: TEST SEAM: draw rounding, noise and obfuscators from a
            seeded ChaCha stream per (seed, round, device) instead of the OS
            CSPRNG (reproducible, not private; labelled ``seeded-insecure``).
    """
    started = time.perf_counter()
    data = data or load_dataset(config.dataset, seed=config.seed)
    keys = keys or InMemoryCommittee(FEDERATION, bits=config.key_bits)
    shm = Path("/dev/shm")
    workdir = Path(
        tempfile.mkdtemp(prefix="edgefl-sim-", dir=shm if shm.is_dir() else None)
    )  # the ledgers: real files (tmpfs when there is one, so fsync costs nothing)
    try:
        sim = _Simulation(config, data, keys, workdir, insecure_seed)
        rounds = sim.run(progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plan = sim.plan
    return SimResult(
        config=asdict(config),
        rounds=rounds,
        sums=[
            np.frombuffer(sim.applied[r.round], dtype="<i8").astype(np.int64)
            for r in rounds
            if r.outcome == "ok"
        ],
        scale=plan.packing.scale,
        noise_sigma=0.0 if plan.noise is None else plan.noise.sigma / plan.packing.scale,
        seconds=time.perf_counter() - started,
        randomness="os-csprng" if insecure_seed is None else "seeded-insecure",
        crypto="paillier" if config.crypto else "unblinded",
        stats=dict(sim.machine.stats),
        rejections=dict(sim.machine.rejections),
        alerts=list(sim.alerts),
    )


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
