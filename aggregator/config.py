"""``aggregator.toml``: settings of the aggregator and the key holder, and the builders.

Paths are relative to the config file's folder. Unknown keys are refused so a
typo is not silently ignored. See :data:`EXAMPLE` (``edgefl aggregator init``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "EXAMPLE",
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

[transport]
url = "mqtt://127.0.0.1:1883"
client_id = "aggregator"             # = its certificate CN; fixed, so the broker keeps the session
clean_start = false
session_expiry_s = 86400
manual_ack = true
"""

_AGG_KEYS = {
    "federation",
    "identity",
    "store",
    "public_key",
    "registry",
    "dimension",
    "initial_model",
    "min_clients",
    "target_clients",
    "max_contributors",
    "round_duration_s",
    "rounds",
    "value_bits",
    "clip",
    "cohort",
    "fixed_denominator",
    "metrics_port",
    "tick_s",
    "optimizer",
    "train",
    "privacy",
    "keyholder_retry_s",
    "policy",
}
_COMMITTEE_KEYS = {"manifest", "mode", "members", "passphrase_file", "allow_unencrypted_key"}
COMMITTEE_MODES = ("remote", "inprocess-insecure-dev")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The parsed file: its folder and its three tables."""

    base: Path
    aggregator: dict[str, Any]
    committee: dict[str, Any]
    transport: dict[str, Any]

    def path(self, value: str) -> Path:
        """Resolve a path relative to the config file."""
        p = Path(value)
        return p if p.is_absolute() else self.base / p


def _check(table: Mapping[str, Any], known: set[str], name: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown [{name}] settings: {', '.join(sorted(unknown))}")
    return dict(table)


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
    """Read and check ``aggregator.toml``.

    Raises:
        ConfigError: missing file, bad TOML or unknown keys.
    """
    p = Path(path)
    doc = read_toml(p)
    if "keyholder" in doc:
        raise ConfigError(
            f"{p}: the [keyholder] table is gone: a committee of key holders replaced the "
            "single key holder; see `edgefl keys ceremony --help` and the [committee] table "
            "of `edgefl aggregator init`"
        )
    unknown = set(doc) - {"aggregator", "committee", "transport"}
    if unknown:
        raise ConfigError(f"{p}: unknown tables {sorted(unknown)}")
    agg = _check(doc.get("aggregator", {}), _AGG_KEYS, "aggregator")
    for key in ("federation", "dimension", "min_clients"):
        if key not in agg:
            raise ConfigError(f"{p}: [aggregator] needs {key}")
    com = _check(doc.get("committee", {}), _COMMITTEE_KEYS, "committee")
    mode = str(com.get("mode", "remote"))
    if mode not in COMMITTEE_MODES:
        raise ConfigError(f"{p}: [committee] mode must be one of {COMMITTEE_MODES}, got {mode!r}")
    return ServiceConfig(p.resolve().parent, agg, com, dict(doc.get("transport", {})))


def _load_or_create(path: Path, name: str) -> Any:
    from edge_sdk.identity import DeviceIdentity

    if path.exists():
        return DeviceIdentity.load(path)
    ident = DeviceIdentity.generate(name)
    ident.save(path)
    return ident


def aggregator_identity(cfg: ServiceConfig) -> Any:
    """The aggregator's Ed25519 identity (created on first use)."""
    return _load_or_create(
        cfg.path(str(cfg.aggregator.get("identity", "aggregator.key"))), "aggregator"
    )


def load_manifest(cfg: ServiceConfig) -> Any:
    """The committee manifest named by ``[committee] manifest``."""
    from aggregator.committee import CommitteeManifest

    return CommitteeManifest.load(
        cfg.path(str(cfg.committee.get("manifest", "keys/committee.json")))
    )


def build_dev_members(
    cfg: ServiceConfig, registry: Any, manifest: Any, min_clients: int, policy: Any = None
) -> Any:
    """In-process members (``inprocess-insecure-dev``): T shares in one process."""
    from aggregator.keyholder_config import load_member_dir
    from edge_sdk.crypto import read_passphrase

    members = cfg.committee.get("members") or []
    quorum = -(-(manifest.size + manifest.threshold) // 2)
    if len(members) < quorum:
        raise ConfigError(
            f"[committee] inprocess-insecure-dev needs the commit quorum, "
            f"ceil((N + T) / 2) = {quorum} member folders in members, got {len(members)}"
        )
    passfile = cfg.committee.get("passphrase_file") or None
    passphrase = read_passphrase(cfg.path(passfile) if passfile else None)
    return [
        load_member_dir(
            cfg.path(str(folder)),
            manifest=manifest,
            registry=registry,
            min_clients=min_clients,
            passphrase=passphrase,
            allow_unencrypted=bool(cfg.committee.get("allow_unencrypted_key", False)),
            verify_sums=False,  # same process as the aggregator: nothing to witness
            policy=policy,
        )
        for folder in members
    ]


def _train_table(agg: Mapping[str, Any]) -> dict[str, Any]:
    """``[aggregator.train]``, checked: a typo would otherwise be announced and ignored."""
    from edge_sdk.models.base import TrainConfig

    train = dict(agg.get("train", {}))
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


def build_aggregator(cfg: ServiceConfig, *, transport: Any = None) -> Any:
    """Build the :class:`~aggregator.service.AggregatorService` of this config."""
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
    federation = str(agg["federation"])
    dimension = int(agg["dimension"])
    min_clients = int(agg["min_clients"])
    target = int(agg.get("target_clients", min_clients))
    max_contributors = int(agg.get("max_contributors", max(1000, target)))
    public_key = load_public_key(cfg.path(str(agg.get("public_key", "keys/paillier_public.json"))))
    registry = DeviceRegistry.load(cfg.path(str(agg.get("registry", "registry.json"))))
    manifest = load_manifest(cfg)
    fed_policy = None
    if agg.get("policy"):
        fed_policy = FederationPolicy.load(cfg.path(str(agg["policy"])))
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
    policy = None
    if agg.get("privacy"):
        try:
            policy = DPPolicy(**dict(agg["privacy"]))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[aggregator.privacy]: {exc}") from None
    elif fed_policy is not None and fed_policy.mode != "none":
        policy = DPPolicy(
            mode=fed_policy.mode,  # type: ignore[arg-type]
            epsilon=fed_policy.epsilon,
            delta=fed_policy.delta,
            rounds=fed_policy.rounds,
            clip=float(agg.get("clip", fed_policy.max_clip)),
            min_clients=fed_policy.min_clients if fed_policy.mode == "distributed" else 1,
        )
    plan = plan_rounds(
        public_key,
        dimension=dimension,
        max_contributors=max_contributors,
        min_clients=min_clients,
        clip=float(agg.get("clip", 1.0)),
        value_bits=int(agg.get("value_bits", 16)),
        policy=policy,
    )
    optimizer_settings = dict(agg.get("optimizer", {}))
    fixed = int(agg.get("fixed_denominator", 0)) or None
    try:
        round_config = RoundConfig(
            federation=federation,
            min_clients=min_clients,
            target_clients=target,
            round_duration_ms=int(float(agg.get("round_duration_s", 300)) * 1000),
            rounds=int(agg.get("rounds", 0)),
            cohort=tuple(agg.get("cohort", ())),
            train=tuple(sorted(_train_table(agg).items())),
            fixed_denominator=fixed,
            keyholder_retry_ms=int(float(agg.get("keyholder_retry_s", 30)) * 1000),
        )
    except ValueError as exc:
        raise ConfigError(f"[aggregator]: {exc}") from None
    initial_path = str(agg.get("initial_model", ""))
    if initial_path:
        weights = np.load(cfg.path(initial_path)).astype(np.float32).reshape(-1)
    else:
        weights = np.zeros(dimension, dtype=np.float32)
    if fed_policy is not None:
        try:
            fed_policy.check_noise(plan.noise, value_bits=plan.packing.value_bits)
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
    if cfg.committee.get("mode", "remote") == "inprocess-insecure-dev":
        import logging

        logging.getLogger("edgefl.aggregator").warning(
            "[committee] mode = inprocess-insecure-dev: %d key shares live in the "
            "aggregator's process; whoever runs it can decrypt every update. "
            "Development only.",
            len(cfg.committee.get("members") or []),
        )
        members = build_dev_members(cfg, registry, manifest, min_clients, fed_policy)
    machine = RoundMachine(
        round_config,
        plan,
        registry,
        make_optimizer(optimizer_settings),
        initial_weights=weights,
        committee=CommitteeVerifier(manifest),
        identity=aggregator_identity(cfg),
        binding=None if fed_policy is None else fed_policy.djn_base,
    )
    store = AggregatorStore(
        cfg.path(str(agg.get("store", "aggregator.db"))),
        federation=federation,
        key_fingerprint=public_key.fingerprint,
    )
    if transport is None:
        transport = make_transport(cfg.transport, default_client_id="aggregator")
    return AggregatorService(
        machine,
        store,
        transport,
        keyholders=members,
        metrics=Metrics(enabled=True, port=int(agg.get("metrics_port", 0))),
        crash=CrashHook(),
    )


def make_transport(settings: Mapping[str, Any], *, default_client_id: str) -> Any:
    """An MQTT transport with durable-subscriber defaults (fixed id, resumed session)."""
    from edge_sdk.transport import MqttTransport, TransportConfig

    values = {
        "client_id": default_client_id,
        "clean_start": False,
        "session_expiry_s": 86_400,
        "manual_ack": True,
        **dict(settings),
    }
    return MqttTransport(TransportConfig.from_dict(values))
