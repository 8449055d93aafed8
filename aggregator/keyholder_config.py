"""``keyholder.toml``, the key ceremony's output folder, and building a committee member.

The ceremony (``edgefl keys ceremony --holders N --threshold T --out DIR``)
writes::

    DIR/paillier_public.json        the federation's ordinary Paillier public key
    DIR/committee.json              the public committee manifest
    DIR/policy.json                 the federation policy, signed by every member
    DIR/keyholder-1/share.json      holder 1's sealed threshold share (0600)
    DIR/keyholder-1/identity.key    holder 1's Ed25519 key (0600; signs results)
    DIR/keyholder-1/keyholder.toml  holder 1's own configuration
    ...

No whole secret key is written anywhere, and the ceremony process forgets
the primes when it returns. Hand each ``keyholder-i`` folder to a different
operator (and machine); give the aggregator only ``paillier_public.json`` and
``committee.json``. Losing ``N - T + 1`` share folders loses the federation's
key (every model after that needs a new ceremony and new enrollment).

Paths in ``keyholder.toml`` are relative to its own folder. Unknown keys are
refused so a typo is not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk._tables import parse_table
from edge_sdk.errors import ConfigError

__all__ = [
    "KEYHOLDER_TEMPLATE",
    "KeyholderConfig",
    "KeyholderTable",
    "PolicyTerms",
    "build_member",
    "load_keyholder_config",
    "load_member_dir",
    "run_ceremony",
]

KEYHOLDER_TEMPLATE = """\
# edgefl key holder (committee member) configuration; paths relative to this file.
# Run: EDGEFL_KEY_PASSPHRASE=... edgefl keyholder serve --config keyholder.toml

[keyholder]
id = "{holder_id}"                   # this member's id: manifest entry, MQTT client id, cert CN
federation = "{federation}"
share = "share.json"                 # sealed threshold share (never copy it elsewhere)
identity = "identity.key"            # Ed25519 key signing this member's results
manifest = "../committee.json"       # the committee's public manifest
policy = "../policy.json"            # the federation policy this member enforces
registry = "{registry}"              # this member's OWN copy of the device registry
min_clients = {min_clients}          # refuse sums of fewer devices, whatever is asked
state = "state.json"                 # rounds answered (request digests, never plaintexts)
witness_grace_s = 60                 # wait this long for updates not seen yet
relay_idle_s = 2                     # then, once no update came for this long, ask for a relay
passphrase_file = ""                 # else $EDGEFL_KEY_PASSPHRASE

[broker]                             # the MQTT client: same keys as a device's [broker]
url = "{broker_url}"
protocol = {protocol}                        # 5, or 311 for brokers without MQTT 5
client_id = "{holder_id}"            # fixed: the broker keeps the session across restarts
clean_start = false
session_expiry_s = 86400
manual_ack = true
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyholderTable:
    """``[keyholder]``: one committee member's identity, files and limits."""

    id: str
    federation: str
    min_clients: int
    share: str = "share.json"
    identity: str = "identity.key"
    manifest: str = "../committee.json"
    policy: str = ""
    registry: str = "registry.json"
    state: str = "state.json"
    witness_grace_s: float = 60.0
    relay_idle_s: float = 2.0
    passphrase_file: str = ""
    allow_unencrypted_key: bool = False

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if not self.witness_grace_s >= 0:
            raise ValueError(f"witness_grace_s must be >= 0, got {self.witness_grace_s}")
        if not self.relay_idle_s >= 0:
            raise ValueError(f"relay_idle_s must be >= 0, got {self.relay_idle_s}")


@dataclass(frozen=True, slots=True)
class KeyholderConfig:
    """A parsed ``keyholder.toml``: its folder, ``[keyholder]`` and ``[broker]``."""

    base: Path
    keyholder: KeyholderTable
    broker: dict[str, Any]

    def path(self, value: str) -> Path:
        """Resolve a path relative to the config file."""
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    @property
    def holder_id(self) -> str:
        """This member's id."""
        return self.keyholder.id


def load_keyholder_config(path: str | Path) -> KeyholderConfig:
    """Read and check ``keyholder.toml``: typed tables, unknown keys refused.

    Raises:
        ConfigError: missing file, bad TOML, unknown or missing keys.
    """
    from aggregator.config import broker_settings, check_tables, read_toml

    p = Path(path)
    doc = read_toml(p)
    if "aggregator" in doc:
        raise ConfigError(
            f"{p}: this looks like aggregator.toml; a key holder has its own keyholder.toml "
            "(written by `edgefl keys ceremony` in each keyholder-i folder)"
        )
    check_tables(doc, p, {"keyholder", "broker"})
    if "keyholder" not in doc:
        raise ConfigError(f"{p}: needs a [keyholder] table")
    try:
        table = parse_table(KeyholderTable, doc["keyholder"], "keyholder")
        broker = broker_settings(doc.get("broker", {}), default_client_id=table.id)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return KeyholderConfig(p.resolve().parent, table, broker)


def load_member_dir(
    folder: Path,
    *,
    manifest: Any,
    registry: Any,
    min_clients: int,
    passphrase: str | bytes | None,
    allow_unencrypted: bool = False,
    holder_id: str | None = None,
    share_file: str = "share.json",
    identity_file: str = "identity.key",
    binding_check: Any = None,
    verify_sums: bool = True,
    policy: Any = None,
) -> Any:
    """Build a member from a ceremony folder (share and identity)."""
    from aggregator.keyholder import KeyHolder
    from aggregator.threshold import load_share
    from edge_sdk.identity import DeviceIdentity

    share = load_share(
        folder / share_file,
        passphrase=passphrase,
        allow_unencrypted=allow_unencrypted,
        expected_committee_fingerprint=manifest.public.fingerprint,
    )
    identity = DeviceIdentity.load(folder / identity_file)
    member_id = holder_id or identity.device_id
    try:
        return KeyHolder(
            share,
            manifest,
            registry,
            holder_id=member_id,
            identity=identity,
            min_clients=min_clients,
            binding_check=binding_check,
            verify_sums=verify_sums,
            policy=policy,
        )
    except ValueError as exc:
        raise ConfigError(f"{folder}: {exc}") from None


def build_member(cfg: KeyholderConfig) -> Any:
    """The committee member of a ``keyholder.toml`` (loads its share)."""
    from aggregator.committee import CommitteeManifest
    from edge_sdk.crypto import read_passphrase
    from edge_sdk.identity import DeviceRegistry
    from edge_sdk.policy import FederationPolicy

    kh = cfg.keyholder
    manifest = CommitteeManifest.load(cfg.path(kh.manifest))
    if manifest.federation != kh.federation:
        raise ConfigError(
            f"manifest is for federation {manifest.federation!r}, the config for {kh.federation!r}"
        )
    passfile = kh.passphrase_file or None
    passphrase = read_passphrase(cfg.path(passfile) if passfile else None)
    registry = DeviceRegistry.load(cfg.path(kh.registry))
    policy = None
    if kh.policy:
        policy = FederationPolicy.load(cfg.path(kh.policy))
    return load_member_dir(
        cfg.base,
        manifest=manifest,
        registry=registry,
        min_clients=kh.min_clients,
        passphrase=passphrase,
        allow_unencrypted=kh.allow_unencrypted_key,
        holder_id=cfg.holder_id,
        share_file=kh.share,
        identity_file=kh.identity,
        policy=policy,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyTerms:
    """The privacy promise written into the ceremony's federation policy.

    Attributes:
        mode: ``distributed``, ``local`` or ``none``.
        min_clients: the quorum the noise is calibrated for (distributed).
        epsilon: each device's total epsilon.
        delta: its delta.
        rounds: the rounds horizon.
        max_clip: largest L2 clip a round may announce.
        binding: publish a DJN base so updates carry binding proofs.
        min_clip: smallest L2 clip a round may announce (None: no floor).
        adaptive_clip: allow adaptive clipping (devices send their
            clipped-or-not bit, docs/privacy.md "Adaptive clipping").
    """

    mode: str = "distributed"
    min_clients: int = 10
    epsilon: float = 8.0
    delta: float = 1e-5
    rounds: int = 100
    max_clip: float = 1.0
    binding: bool = True
    min_clip: float | None = None
    adaptive_clip: bool = False


def run_ceremony(
    out: Path,
    *,
    federation: str,
    holders: int,
    threshold: int,
    bits: int = 2048,
    passphrase: bytes | None,
    insecure_unencrypted: bool = False,
    min_clients: int = 10,
    registry: str = "../../registry.json",
    broker_url: str = "mqtt://127.0.0.1:1883",
    protocol: int = 5,
    holder_prefix: str = "keyholder-",
    allow_insecure_size: bool = False,
    primes: tuple[int, int] | None = None,
    terms: PolicyTerms | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate the federation key as ``N`` shares and write the ceremony folder.

    Args:
        out: the ceremony folder.
        federation: the federation.
        holders: ``N``.
        threshold: ``T``.
        bits: modulus size.
        passphrase: seals the shares (None only with ``insecure_unencrypted``).
        insecure_unencrypted: shares in clear (development).
        min_clients: each member's own quorum (written into its config).
        registry: registry path for the members' configs.
        broker_url: broker URL for the members' configs.
        protocol: MQTT protocol for the members' configs.
        holder_prefix: member ids are ``{prefix}{i}``.
        allow_insecure_size: allow moduli below 2048 bits (tests).
        primes: known safe primes (tests; skips prime generation).
        terms: the federation policy (default: :class:`PolicyTerms` with
            ``min_clients``); every member signs it.
        overwrite: replace an existing ceremony.

    Returns:
        A summary: fingerprints, paths, timings (no secret).

    Raises:
        ConfigError: ``out`` already holds a ceremony (and not ``overwrite``).
        ValueError: invalid ``holders`` / ``threshold`` / ``bits``.
    """
    import time

    from aggregator.committee import CommitteeManifest, HolderInfo
    from aggregator.threshold import ceremony, save_share
    from edge_sdk.crypto import DJNBase, save_public_key
    from edge_sdk.identity import DeviceIdentity
    from edge_sdk.policy import FederationPolicy

    if (out / "committee.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a ceremony (committee.json); refusing to overwrite")
    started = time.perf_counter()
    result = ceremony(
        bits,
        holders=holders,
        threshold=threshold,
        primes=primes,
        allow_insecure_size=allow_insecure_size,
    )
    ceremony_s = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    identities = [DeviceIdentity.generate(f"{holder_prefix}{i}") for i in range(1, holders + 1)]
    manifest = CommitteeManifest(
        federation=federation,
        key_fingerprint=result.public_key.fingerprint,
        public=result.committee,
        holders=tuple(
            HolderInfo(holder_id=ident.device_id, index=i, public_key=ident.public_key_bytes)
            for i, ident in enumerate(identities, start=1)
        ),
    )
    terms = terms or PolicyTerms(min_clients=min_clients)
    policy = FederationPolicy(
        federation=federation,
        key_fingerprint=manifest.key_fingerprint,
        committee_fingerprint=manifest.fingerprint,
        threshold=threshold,
        holders=tuple((h.holder_id, h.public_key) for h in manifest.holders),
        mode=terms.mode,
        min_clients=terms.min_clients if terms.mode == "distributed" else 1,
        epsilon=terms.epsilon,
        delta=terms.delta,
        rounds=terms.rounds,
        max_clip=terms.max_clip,
        min_clip=terms.min_clip,
        adaptive_clip=terms.adaptive_clip,
        djn_base=DJNBase.generate(result.public_key) if terms.binding else None,
    )
    for ident in identities:  # the dealer holds every member's new key right now
        policy = policy.signed_by(ident)
    save_public_key(result.public_key, out / "paillier_public.json", overwrite=overwrite)
    manifest.save(out / "committee.json")
    policy.save(out / "policy.json")
    folders = []
    for share, ident in zip(result.shares, identities, strict=True):
        folder = out / ident.device_id
        folder.mkdir(mode=0o700, exist_ok=True)
        save_share(
            share,
            folder / "share.json",
            passphrase=passphrase,
            insecure_unencrypted=insecure_unencrypted,
            overwrite=overwrite,
        )
        ident.save(folder / "identity.key")
        toml = KEYHOLDER_TEMPLATE.format(
            holder_id=ident.device_id,
            federation=federation,
            registry=registry,
            min_clients=min_clients,
            broker_url=broker_url,
            protocol=protocol,
        )
        if insecure_unencrypted:
            toml = toml.replace(
                'passphrase_file = ""                 # else $EDGEFL_KEY_PASSPHRASE',
                'passphrase_file = ""\nallow_unencrypted_key = true  # INSECURE: share in clear',
            )
        (folder / "keyholder.toml").write_text(toml, encoding="utf-8")
        folders.append(str(folder))
    del result
    return {
        "federation": federation,
        "holders": holders,
        "threshold": threshold,
        "bits": bits,
        "key_fingerprint": manifest.key_fingerprint,
        "committee_fingerprint": manifest.fingerprint,
        "public_key": str(out / "paillier_public.json"),
        "manifest": str(out / "committee.json"),
        "policy": str(out / "policy.json"),
        "policy_digest": policy.digest,
        "members": folders,
        "ceremony_s": round(ceremony_s, 3),
    }
