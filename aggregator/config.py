"""``aggregator.toml``: settings of the aggregator and the key holder, and the builders.

Paths are relative to the config file's folder. Unknown keys are refused so a
typo is not silently ignored. See :data:`EXAMPLE` (``edgefl aggregator init``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk._tables import parse_table
from edge_sdk.errors import ConfigError, EdgeFLError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "COMMITTEE_MODES",
    "EXAMPLE",
    "AggregatorTable",
    "CommitteeTable",
    "broker_settings",
    "check_tables",
    "ServiceConfig",
    "aggregator_identity",
    "build_aggregator",
    "build_dev_members",
    "load_manifest",
    "load_config",
]

EXAMPLE = """\
# edgefl aggregator configuration (paths are relative to this file)

[aggregator]
federation = "demo"
store = "aggregator.db"              # SQLite (WAL); back it up with `sqlite3 .backup`
public_key = "keys/paillier_public.json"     # the federation's Paillier PUBLIC key
policy = "keys/policy.json"          # the committee-signed federation policy: the noise,
                                     # quorum and budget come from it (devices refuse
                                     # anything outside it; so do the key holders)
registry = "registry.json"           # enrolled devices (Ed25519 public keys)
identity = "aggregator.key"          # Ed25519 key signing rounds, models, receipts
                                     # (created if missing; give devices its public key:
                                     #  `edgefl aggregator identity --config ...`)
dimension = 7850                     # model parameters
initial_model = ""                   # .npy float32 vector; zeros when empty
min_clients = 10                     # quorum (the key holder enforces its own too)
target_clients = 50                  # close the round as soon as this many arrived
max_contributors = 1000              # packing headroom: most updates in one sum
round_duration_s = 300               # deadline after the announcement
rounds = 0                           # successful rounds to run; 0 = forever
value_bits = 16
clip = 1.0                           # L2 clip of a device delta
cohort = []                          # device ids; empty = every enrolled device
fixed_denominator = 0                # DP-FedAvg: divide by this instead of the count
metrics_port = 0                     # Prometheus endpoint (needs prometheus-client)
tick_s = 0.2
commit_batch = 64                    # group commit: most accepted updates per transaction
                                     # (one fsync each); 1 = one commit per update
commit_max_ms = 5                    # ...and most ms an accepted update waits for its batch;
                                     # receipts are sent only once their batch is on disk
workers = 1                          # > 1: a root (`edgefl aggregator serve`) and this many
                                     # workers (`... serve --worker K`, K = 0..workers-1), each
                                     # taking one shard of the devices (docs/scale.md); a
                                     # worker may get its own broker user in [worker_broker.K]

[aggregator.optimizer]
name = "fedavg"                      # fedavg | fedavgm | fedadam | fedyogi | fedadagrad
lr = 1.0                             # (docs/strategies.md: each one's settings and defaults)

[aggregator.train]                   # announced to devices as (key, value) pairs
epochs = 1
batch_size = 32
lr = 0.05
# prox_mu = 0.01                     # FedProx: pull local training toward the global
                                     # model (0..10, lr * prox_mu < 2; devices check it)

# Optional: a stricter DP calibration than the policy's (never looser: devices
# and key holders refuse a round outside the policy). Without it the rounds
# use the policy's mode, epsilon, delta, rounds, quorum and clip.
# [aggregator.privacy]
# mode = "distributed"
# epsilon = 8.0
# delta = 1e-6
# rounds = 100
# min_clients = 10

[committee]
# The key-holder committee (`edgefl keys ceremony --holders 3 --threshold 2`):
# T of N members, each its own process (`edgefl keyholder serve --config
# keys/keyholder-1/keyholder.toml`), each verifying on its own before it
# releases a decryption share. The aggregator holds only this public manifest.
manifest = "keys/committee.json"
mode = "remote"                      # remote | inprocess-insecure-dev
# inprocess-insecure-dev runs the members inside the aggregator's process:
# whoever runs the aggregator then holds T shares, i.e. the whole secret key.
# For a laptop demo only; never for real data.
# members = ["keys/keyholder-1", "keys/keyholder-2", "keys/keyholder-3"]
# passphrase_file = ""               # else $EDGEFL_KEY_PASSPHRASE

[broker]                             # the MQTT client: same keys as a device's [broker]
url = "mqtt://127.0.0.1:1883"
client_id = "aggregator"             # = its certificate CN; fixed, so the broker keeps the session
clean_start = false
session_expiry_s = 86400
manual_ack = true
"""

_EVALUATION_KEYS = {"every", "max_examples", "max_loss", "loss_scale", "noise_multiplier"}
_ADAPTIVE_KEYS = {"target_quantile", "lr", "initial_clip", "min_clip", "max_clip", "bit_noise"}
COMMITTEE_MODES = ("remote", "inprocess-insecure-dev")


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatorTable:
    """``[aggregator]``: the federation, its files and the round settings.

    Sub-tables are checked when the file is loaded, each by its owner:
    ``optimizer`` by :func:`aggregator.optimizers.make_optimizer`, ``train``
    by :class:`edge_sdk.models.base.TrainConfig`, ``privacy`` by
    :class:`edge_sdk.privacy.DPPolicy`.
    """

    federation: str
    dimension: int
    min_clients: int
    store: str = "aggregator.db"
    public_key: str = "keys/paillier_public.json"
    policy: str = ""
    registry: str = "registry.json"
    identity: str = "aggregator.key"
    initial_model: str = ""
    target_clients: int | None = None
    max_contributors: int | None = None
    round_duration_s: float = 300.0
    rounds: int = 0
    value_bits: int = 16
    clip: float | None = None
    cohort: tuple[str, ...] = ()
    fixed_denominator: int = 0
    metrics_port: int = 0
    tick_s: float = 0.2
    keyholder_retry_s: float = 30.0
    commit_batch: int = 64
    commit_max_ms: float = 5.0
    witness_relay: bool = True
    workers: int = 1
    optimizer: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    adaptive_clip: dict[str, Any] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("dimension", "min_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("round_duration_s", "tick_s", "keyholder_retry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rounds < 0 or self.fixed_denominator < 0:
            raise ValueError("rounds and fixed_denominator must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be a port number, got {self.metrics_port}")
        commit_settings({"commit_batch": self.commit_batch, "commit_max_ms": self.commit_max_ms})
        if not 1 <= self.workers <= 256:
            raise ValueError(f"workers must be in 1..256, got {self.workers}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitteeTable:
    """``[committee]``: the key-holder committee the aggregator asks."""

    manifest: str = "keys/committee.json"
    mode: str = "remote"
    members: tuple[str, ...] = ()
    passphrase_file: str = ""
    allow_unencrypted_key: bool = False

    def __post_init__(self) -> None:
        if self.mode not in COMMITTEE_MODES:
            raise ValueError(f"mode must be one of {COMMITTEE_MODES}, got {self.mode!r}")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The parsed ``aggregator.toml``: its folder and its typed tables.

    ``broker`` is the MQTT client table (the same keys as a device's
    ``[broker]``, checked by :class:`edge_sdk.transport.TransportConfig`).
    ``worker_broker`` holds, per worker index, the keys of ``[worker_broker.K]``
    that worker K uses instead of ``[broker]``'s (its own broker user,
    password or certificate where the broker ties client ids to users).
    """

    base: Path
    aggregator: AggregatorTable
    committee: CommitteeTable
    broker: dict[str, Any]
    worker_broker: dict[int, dict[str, Any]] = field(default_factory=dict)

    def broker_for(self, worker: int | None) -> dict[str, Any]:
        """The MQTT settings of the root (``None``) or of worker ``worker``.

        A worker's client id defaults to ``{client_id}-worker-{K}`` (its own
        durable session); ``[worker_broker.K]`` overrides any key.
        """
        if worker is None:
            return dict(self.broker)
        own = self.worker_broker.get(worker, {})
        values = {**self.broker, **own}
        if "client_id" not in own:
            values["client_id"] = f"{self.broker.get('client_id', 'aggregator')}-worker-{worker}"
        return broker_settings(values, default_client_id=values["client_id"])

    def path(self, value: str) -> Path:
        """Resolve a path relative to the config file."""
        p = Path(value)
        return p if p.is_absolute() else self.base / p


def check_tables(doc: Mapping[str, Any], path: Path, known: set[str]) -> None:
    """Refuse unknown tables, and the old name ``[transport]`` with its new one.

    Raises:
        ConfigError: the message names the table.
    """
    if "transport" in doc:
        raise ConfigError(
            f"{path}: the [transport] table is now called [broker] (one name for the MQTT "
            "client table on devices, aggregator and key holders; same keys): rename it"
        )
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown)}")


def broker_settings(table: Any, *, default_client_id: str) -> dict[str, Any]:
    """``[broker]`` with the durable-subscriber defaults, checked.

    The defaults suit a service (fixed client id, resumed session, manual
    acknowledgement); the table overrides them.

    Raises:
        ConfigError: not a table, an unknown key or a bad value.
    """
    from edge_sdk.transport import TransportConfig

    if not isinstance(table, Mapping):
        raise ConfigError("[broker] must be a table")
    values = {
        "client_id": default_client_id,
        "clean_start": False,
        "session_expiry_s": 86_400,
        "manual_ack": True,
        **dict(table),
    }
    try:
        TransportConfig.from_dict(values)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"[broker]: {exc}") from None
    return values


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict.

    Raises:
        ConfigError: the file is missing or not valid TOML (the message names it).
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_config(path: str | Path) -> ServiceConfig:
    """Read and check ``aggregator.toml``: every table typed, unknown keys refused.

    Raises:
        ConfigError: missing file, bad TOML, an unknown table or key, a
            missing or malformed value (the message names it).
    """
    from aggregator.optimizers import make_optimizer

    p = Path(path)
    doc = read_toml(p)
    if "keyholder" in doc:
        raise ConfigError(
            f"{p}: the [keyholder] table is gone: a committee of key holders replaced the "
            "single key holder; see `edgefl keys ceremony --help` and the [committee] table "
            "of `edgefl aggregator init`"
        )
    check_tables(doc, p, {"aggregator", "committee", "broker", "worker_broker"})
    try:
        agg = parse_table(AggregatorTable, doc.get("aggregator", {}), "aggregator")
        com = parse_table(CommitteeTable, doc.get("committee", {}), "committee")
        make_optimizer(agg.optimizer)
        _train_table(agg)
        _privacy_table(agg)
        _learning_tables(agg, None)  # the policy's clip range is checked when built
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    broker = broker_settings(doc.get("broker", {}), default_client_id="aggregator")
    workers: dict[int, dict[str, Any]] = {}
    table = doc.get("worker_broker", {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"{p}: [worker_broker] must hold tables [worker_broker.K]")
    for key, value in table.items():
        if not key.isdigit() or not 0 <= int(key) < agg.workers or not isinstance(value, Mapping):
            raise ConfigError(
                f"{p}: [worker_broker.{key}]: K must be a worker index 0..{agg.workers - 1}"
            )
        workers[int(key)] = dict(value)
        broker_settings({**broker, **value}, default_client_id="aggregator")  # checked now
    return ServiceConfig(p.resolve().parent, agg, com, broker, workers)


def _load_or_create(path: Path, name: str) -> Any:
    from edge_sdk.identity import DeviceIdentity

    if path.exists():
        return DeviceIdentity.load(path)
    ident = DeviceIdentity.generate(name)
    ident.save(path)
    return ident


def aggregator_identity(cfg: ServiceConfig) -> Any:
    """The aggregator's Ed25519 identity (created on first use)."""
    return _load_or_create(cfg.path(cfg.aggregator.identity), "aggregator")


def load_manifest(cfg: ServiceConfig) -> Any:
    """The committee manifest named by ``[committee] manifest``."""
    from aggregator.committee import CommitteeManifest

    return CommitteeManifest.load(cfg.path(cfg.committee.manifest))


def build_dev_members(
    cfg: ServiceConfig, registry: Any, manifest: Any, min_clients: int, policy: Any = None
) -> Any:
    """In-process members (``inprocess-insecure-dev``): T shares in one process."""
    from aggregator.committee import commit_quorum
    from aggregator.keyholder_config import load_member_dir
    from edge_sdk.crypto import read_passphrase

    members = cfg.committee.members
    quorum = commit_quorum(manifest.size, manifest.threshold)
    if len(members) < quorum:
        raise ConfigError(
            f"[committee] inprocess-insecure-dev needs the commit quorum, "
            f"ceil((N + T) / 2) = {quorum} member folders in members, got {len(members)}"
        )
    passfile = cfg.committee.passphrase_file or None
    passphrase = read_passphrase(cfg.path(passfile) if passfile else None)
    return [
        load_member_dir(
            cfg.path(str(folder)),
            manifest=manifest,
            registry=registry,
            min_clients=min_clients,
            passphrase=passphrase,
            allow_unencrypted=cfg.committee.allow_unencrypted_key,
            verify_sums=False,  # same process as the aggregator: nothing to witness
            policy=policy,
        )
        for folder in members
    ]


def _train_table(agg: AggregatorTable) -> dict[str, Any]:
    """``[aggregator.train]``, checked: a typo would otherwise be announced and ignored."""
    from edge_sdk.models.base import TrainConfig

    train = dict(agg.train)
    allowed = set(TrainConfig.__dataclass_fields__) | {"clip"}
    unknown = sorted(set(train) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown [aggregator.train] settings: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(allowed))})"
        )
    try:
        TrainConfig(**{k: v for k, v in train.items() if k != "clip"})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[aggregator.train]: {exc}") from None
    return train


def _privacy_table(agg: AggregatorTable) -> Any:
    """``[aggregator.privacy]`` as a :class:`~edge_sdk.privacy.DPPolicy`, or None."""
    from edge_sdk.privacy import DPPolicy

    if not agg.privacy:
        return None
    try:
        return DPPolicy(**agg.privacy)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[aggregator.privacy]: {exc}") from None


def _check(table: Mapping[str, Any], known: set[str], name: str) -> dict[str, Any]:
    """A sub-table whose keys are checked here (its values by its owner's dataclass)."""
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown [{name}] settings: {', '.join(sorted(unknown))}")
    return dict(table)


def _learning_tables(agg: AggregatorTable, fed_policy: Any) -> tuple[Any, Any]:
    """``[aggregator.evaluation]`` and ``[aggregator.adaptive_clip]``, checked (or None).

    The adaptive clip range defaults to the signed policy's ``[min_clip,
    max_clip]``; a range outside it is refused here, as every device and
    member would refuse its rounds.
    """
    from aggregator.planning import AdaptiveClipPlan, EvaluationPlan

    evaluation = adaptive = None
    try:
        if agg.evaluation is not None:
            table = _check(agg.evaluation, _EVALUATION_KEYS, "aggregator.evaluation")
            evaluation = EvaluationPlan(**table)
        if agg.adaptive_clip is not None:
            table = _check(agg.adaptive_clip, _ADAPTIVE_KEYS, "aggregator.adaptive_clip")
            if fed_policy is not None:
                if not fed_policy.adaptive_clip:
                    raise ConfigError(
                        "[aggregator.adaptive_clip]: the federation policy does not allow "
                        "adaptive clipping (a new policy needs adaptive_clip = true)"
                    )
                table.setdefault("max_clip", fed_policy.max_clip)
                if fed_policy.min_clip is not None:
                    table.setdefault("min_clip", fed_policy.min_clip)
                if table["max_clip"] > fed_policy.max_clip or table.get("min_clip", 0.0) < (
                    fed_policy.min_clip or 0.0
                ):
                    raise ConfigError(
                        "[aggregator.adaptive_clip]: the clip range is outside the policy's "
                        f"[{fed_policy.min_clip}, {fed_policy.max_clip}]"
                    )
            adaptive = AdaptiveClipPlan(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[aggregator] learning settings: {exc}") from None
    return evaluation, adaptive


def worker_store(store: Path, shard: int) -> Path:
    """Worker ``shard``'s own store beside the root's (``agg.db``: ``agg.worker-0.db``)."""
    return store.with_name(f"{store.stem}.worker-{shard}{store.suffix}")


def build_aggregator(
    cfg: ServiceConfig, *, transport: Any = None, worker: int | None = None
) -> Any:
    """Build the :class:`~aggregator.service.AggregatorService` of this config.

    With ``[aggregator] workers`` > 1 it is the round's root, or with
    ``worker`` = K the worker owning shard K (its own store and MQTT session).

    Raises:
        ConfigError: the config is inconsistent, or ``worker`` is given
            without workers or out of range.
    """
    import numpy as np

    from aggregator.committee import CommitteeVerifier
    from aggregator.metrics import Metrics
    from aggregator.optimizers import make_optimizer
    from aggregator.planning import plan_rounds
    from aggregator.rounds import RoundConfig, RoundMachine
    from aggregator.service import AggregatorService, CrashHook
    from aggregator.store import AggregatorStore
    from edge_sdk.crypto import load_public_key
    from edge_sdk.errors import RemoteProtocolError
    from edge_sdk.identity import DeviceRegistry
    from edge_sdk.policy import FederationPolicy
    from edge_sdk.privacy import DPPolicy

    agg = cfg.aggregator
    if worker is not None and agg.workers < 2:
        raise ConfigError("--worker needs [aggregator] workers >= 2")
    if worker is not None and not 0 <= worker < agg.workers:
        raise ConfigError(f"--worker must be in 0..{agg.workers - 1}, got {worker}")
    federation = agg.federation
    dimension = agg.dimension
    min_clients = agg.min_clients
    target = agg.target_clients if agg.target_clients is not None else min_clients
    # Sharded, each worker holds at most max_contributors // workers updates
    # (the packing headroom is shared): the default leaves room for shards of
    # unequal size (device ids hash to shards; about sqrt(n / workers) apart).
    slack = 0 if agg.workers <= 1 else target // 4 + 64 * agg.workers
    max_contributors = (
        agg.max_contributors if agg.max_contributors is not None else max(1000, target + slack)
    )
    try:  # a file the configuration names that is missing or unusable: a configuration error
        public_key = load_public_key(cfg.path(agg.public_key))
        registry = DeviceRegistry.load(cfg.path(agg.registry))
        manifest = load_manifest(cfg)
        fed_policy = FederationPolicy.load(cfg.path(agg.policy)) if agg.policy else None
    except ConfigError:
        raise
    except (EdgeFLError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    if fed_policy is not None:
        if (
            fed_policy.committee_fingerprint != manifest.fingerprint
            or fed_policy.key_fingerprint != public_key.fingerprint
            or fed_policy.federation != federation
        ):
            raise ConfigError(
                "[aggregator] policy is for another federation, key or committee than "
                "[aggregator] public_key and [committee] manifest"
            )
        registry.require_approvals(
            {h.holder_id: h.public_key for h in manifest.holders}, manifest.threshold
        )
    policy = _privacy_table(agg)
    if policy is None and fed_policy is not None and fed_policy.mode != "none":
        policy = DPPolicy(
            mode=fed_policy.mode,  # type: ignore[arg-type]
            epsilon=fed_policy.epsilon,
            delta=fed_policy.delta,
            rounds=fed_policy.rounds,
            clip=agg.clip if agg.clip is not None else fed_policy.max_clip,
            min_clients=fed_policy.min_clients if fed_policy.mode == "distributed" else 1,
        )
    evaluation, adaptive = _learning_tables(agg, fed_policy)
    fixed_clip = agg.clip if agg.clip is not None else 1.0
    first_clip = fixed_clip if adaptive is None else adaptive.initial_clip
    if policy is not None and adaptive is not None:
        policy = dataclasses.replace(policy, clip=first_clip)
    plan = plan_rounds(
        public_key,
        dimension=dimension,
        max_contributors=max_contributors,
        min_clients=min_clients,
        clip=first_clip,
        value_bits=agg.value_bits,
        policy=policy,
        evaluation=evaluation,
        adaptive=adaptive,
    )
    fixed = agg.fixed_denominator or None
    try:
        round_config = RoundConfig(
            federation=federation,
            min_clients=min_clients,
            target_clients=target,
            round_duration_ms=int(agg.round_duration_s * 1000),
            rounds=agg.rounds,
            cohort=agg.cohort,
            train=tuple(sorted(_train_table(agg).items())),
            fixed_denominator=fixed,
            keyholder_retry_ms=int(agg.keyholder_retry_s * 1000),
        )
    except ValueError as exc:
        raise ConfigError(f"[aggregator]: {exc}") from None
    if agg.initial_model:
        weights = np.load(cfg.path(agg.initial_model)).astype(np.float32).reshape(-1)
    else:
        weights = np.zeros(dimension, dtype=np.float32)
    if fed_policy is not None:
        try:
            fed_policy.check_noise(
                plan.noise,
                value_bits=plan.packing.value_bits,
                extras=plan.packing_for(plan.evaluation.every if plan.evaluation else 1).extras,
            )
        except RemoteProtocolError as exc:
            raise ConfigError(f"[aggregator] settings: {exc}") from None
    if manifest.key_fingerprint != public_key.fingerprint:
        raise ConfigError(
            "[committee] manifest is for Paillier key "
            f"{manifest.key_fingerprint[:16]}..., [aggregator] public_key is "
            f"{public_key.fingerprint[:16]}..."
        )
    if manifest.federation != federation:
        raise ConfigError(
            f"[committee] manifest is for federation {manifest.federation!r}, not {federation!r}"
        )
    members = []
    if cfg.committee.mode == "inprocess-insecure-dev":
        import logging

        logging.getLogger("edgefl.aggregator").warning(
            "[committee] mode = inprocess-insecure-dev: %d key shares live in the "
            "aggregator's process; whoever runs it can decrypt every update. "
            "Development only.",
            len(cfg.committee.members),
        )
        members = build_dev_members(cfg, registry, manifest, min_clients, fed_policy)
    common: dict[str, Any] = {
        "initial_weights": weights,
        "committee": CommitteeVerifier(manifest),
        "identity": aggregator_identity(cfg),
        "binding": None if fed_policy is None else fed_policy.djn_base,
    }
    optimizer = make_optimizer(agg.optimizer)
    store_path = cfg.path(agg.store)
    broker = cfg.broker_for(worker)
    if agg.workers > 1 and members:
        raise ConfigError(
            "[committee] mode = inprocess-insecure-dev cannot run with [aggregator] workers > 1 "
            "(the members witness updates the workers take)"
        )
    machine: RoundMachine
    try:
        if worker is not None:
            from aggregator.shards import WorkerMachine

            machine = WorkerMachine(
                round_config, plan, registry, optimizer, shard=worker, shards=agg.workers, **common
            )
            store_path = worker_store(store_path, worker)
        elif agg.workers > 1:
            from aggregator.shards import RootMachine

            machine = RootMachine(
                round_config, plan, registry, optimizer, shards=agg.workers, **common
            )
        else:
            machine = RoundMachine(round_config, plan, registry, optimizer, **common)
    except ValueError as exc:
        raise ConfigError(f"[aggregator]: {exc}") from None
    store = AggregatorStore(
        store_path,
        federation=federation,
        key_fingerprint=public_key.fingerprint,
    )
    if transport is None:
        transport = make_transport(broker, default_client_id="aggregator")
    return AggregatorService(
        machine,
        store,
        transport,
        keyholders=members,
        metrics=Metrics(enabled=True, port=agg.metrics_port),
        crash=CrashHook(),
        commit_batch=agg.commit_batch,
        commit_max_ms=agg.commit_max_ms,
        relay_dir=relay_folder(store_path) if agg.witness_relay else None,
    )


def relay_folder(store: Path) -> Path:
    """Where the service keeps a round's accepted updates for the witness relay."""
    return store.with_name(store.name + ".relay")


def commit_settings(agg: Mapping[str, Any]) -> tuple[int, float]:
    """``(commit_batch, commit_max_ms)`` of an ``[aggregator]`` table, checked.

    Raises:
        ConfigError: not a positive count / a non-negative number of milliseconds.
    """
    from aggregator.service import DEFAULT_COMMIT_BATCH, DEFAULT_COMMIT_MAX_MS

    batch = agg.get("commit_batch", DEFAULT_COMMIT_BATCH)
    max_ms = agg.get("commit_max_ms", DEFAULT_COMMIT_MAX_MS)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"[aggregator] commit_batch must be an integer >= 1, got {batch!r}")
    if isinstance(max_ms, bool) or not isinstance(max_ms, (int, float)) or not 0 <= max_ms <= 1000:
        raise ConfigError(
            f"[aggregator] commit_max_ms must be a number of milliseconds in [0, 1000], "
            f"got {max_ms!r}"
        )
    return batch, float(max_ms)


def make_transport(settings: Mapping[str, Any], *, default_client_id: str) -> Any:
    """An MQTT transport with durable-subscriber defaults (fixed id, resumed session)."""
    from edge_sdk.transport import MqttTransport, TransportConfig

    return MqttTransport(
        TransportConfig.from_dict(broker_settings(settings, default_client_id=default_client_id))
    )
