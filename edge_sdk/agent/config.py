"""Device agent configuration: a TOML file plus environment overrides.

Every key can be overridden by ``EDGEFL_<SECTION>_<KEY>`` (upper case), e.g.
``EDGEFL_BROKER_URL=mqtts://broker:8883`` or ``EDGEFL_DEVICE_ID=pi-17``.
Values from the environment are parsed as TOML scalars when they look like
numbers or booleans, else taken as strings.

Example (``examples/device.toml``)::

    [device]
    id = "pi-17"
    federation = "clinic"
    state_dir = "/var/lib/edgefl"

    [broker]
    url = "mqtts://broker.example:8883"
    ca_file = "/etc/edgefl/ca.pem"
    cert_file = "/etc/edgefl/pi-17.pem"
    key_file = "/etc/edgefl/pi-17.key"

    [keys]
    public_key = "/etc/edgefl/paillier.pub.json"
    aggregator_key = "..."   # hex; then only signed rounds, models, receipts count

    [privacy]
    budget_epsilon = 8.0
    delta = 1e-5

    [training]
    model = "onnx"
    onnx_path = "/etc/edgefl/model.onnx"
    data = "/var/lib/edgefl/data.npz"
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk._tables import parse_table, table_keys
from edge_sdk.errors import ConfigError
from edge_sdk.ids import ID_PATTERN, is_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "TABLES",
    "BrokerTable",
    "DeviceConfig",
    "DeviceTable",
    "KeysTable",
    "PrivacyTable",
    "TrainingTable",
    "load_device_config",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceTable:
    """``[device]``: who this device is and where it keeps its state."""

    id: str
    federation: str
    state_dir: str
    resend_initial_s: float = 15.0
    resend_max_s: float = 300.0
    model_fetch_s: float = 10.0
    pool_target: int = -1

    def __post_init__(self) -> None:
        if not is_id(self.id) or not is_id(self.federation):
            raise ValueError(f"id and federation must match {ID_PATTERN.pattern}")
        if not 0 < self.resend_initial_s <= self.resend_max_s:
            raise ValueError("need 0 < resend_initial_s <= resend_max_s")
        if not self.model_fetch_s > 0:
            raise ValueError(f"model_fetch_s must be > 0, got {self.model_fetch_s}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerTable:
    """``[broker]``: the MQTT client (the client id is the device id).

    The same keys as the aggregator's and key holders' ``[broker]``, less
    those a device must not choose (its client id and session handling);
    values are checked by :class:`edge_sdk.transport.TransportConfig`.
    """

    url: str
    protocol: int | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int | None = None
    max_message_size: int | None = None
    broker_max_packet_size: int | None = None
    failover_urls: tuple[str, ...] | None = None

    def settings(self) -> dict[str, Any]:
        """The keys that were set, for :class:`~edge_sdk.transport.TransportConfig`."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KeysTable:
    """``[keys]``: the federation's public key, policy and the aggregator's signing key."""

    public_key: str
    fingerprint: str = ""
    aggregator_key: str = ""
    policy: str = ""
    policy_digest: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyTable:
    """``[privacy]``: this device's own lifetime budget."""

    budget_epsilon: float = 8.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.budget_epsilon > 0 or not 0 < self.delta < 1:
            raise ValueError(
                f"needs budget_epsilon > 0 and 0 < delta < 1, got {self.budget_epsilon}, "
                f"{self.delta}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingTable:
    """``[training]``: the model; checked by :func:`edge_sdk.models.build_model`.

    With ``model = "package.module:factory"`` any other keys are allowed:
    the whole table goes to the user's factory.
    """

    model: str = "softmax"
    onnx_path: str = ""
    data: str = ""
    classes: int = 0
    features: int = 0
    loss: str = ""
    trainable: tuple[str, ...] = ()


#: Each table of ``device.toml`` and its dataclass.
TABLES: dict[str, type[Any]] = {
    "device": DeviceTable,
    "broker": BrokerTable,
    "keys": KeysTable,
    "privacy": PrivacyTable,
    "training": TrainingTable,
}
_SECTIONS: dict[str, set[str]] = {name: table_keys(cls) for name, cls in TABLES.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """Validated device configuration (see the module docstring for the file)."""

    device_id: str
    federation: str
    state_dir: Path
    broker: dict[str, Any]
    public_key: Path
    fingerprint: str | None = None
    aggregator_key: bytes | None = None
    policy: Path | None = None
    policy_digest: str | None = None
    budget_epsilon: float = 8.0
    delta: float = 1e-5
    training: dict[str, Any] = field(default_factory=dict)
    resend_initial_s: float = 15.0
    resend_max_s: float = 300.0
    model_fetch_s: float = 10.0
    pool_target: int = -1

    @property
    def identity_file(self) -> Path:
        """The device's Ed25519 key: ``state_dir/device.key``."""
        return self.state_dir / "device.key"

    @property
    def ledger_file(self) -> Path:
        """The privacy ledger: ``state_dir/ledger.json``."""
        return self.state_dir / "ledger.json"

    @property
    def outbox_dir(self) -> Path:
        """Sealed updates awaiting receipts."""
        return self.state_dir / "outbox"

    @property
    def model_file(self) -> Path:
        """The last applied global model message."""
        return self.state_dir / "model.bin"

    @property
    def policy_pin_file(self) -> Path:
        """The digest of the federation policy pinned at enrollment."""
        return self.state_dir / "policy.pin"

    @property
    def pool_dir(self) -> Path:
        """Precomputed Paillier obfuscators."""
        return self.state_dir / "pool"


def _hex_key(value: Any) -> bytes | None:
    if value is None or value == "":
        return None
    try:
        key = bytes.fromhex(str(value))
    except ValueError:
        raise ConfigError(f"[keys] aggregator_key must be hex, got {value!r}") from None
    if len(key) != 32:
        raise ConfigError(f"[keys] aggregator_key must be 32 bytes (64 hex digits), got {len(key)}")
    return key


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge_env(doc: dict[str, Any], env: Mapping[str, str]) -> None:
    for section, keys in _SECTIONS.items():
        for key in keys:
            name = f"EDGEFL_{section.upper()}_{key.upper()}"
            if name in env:
                doc.setdefault(section, {})[key] = _env_value(env[name])


def load_device_config(
    path: str | Path | None, *, env: Mapping[str, str] | None = None
) -> DeviceConfig:
    """Read a device config file and apply environment overrides.

    Args:
        path: TOML file, or None to configure from the environment alone.
        env: environment (``os.environ`` by default).

    Raises:
        ConfigError: unreadable file, unknown section or key, missing or
            invalid value (the message names it).
    """
    doc: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    _merge_env(doc, os.environ if env is None else env)
    for section in doc:
        if section not in TABLES:
            raise ConfigError(f"unknown config section [{section}] (known: {', '.join(TABLES)})")

    def table(name: str) -> Any:
        values = doc.get(name, {})
        # model = "package.module:factory": the whole table goes to the factory
        factory = name == "training" and ":" in str(
            values.get("model", "") if isinstance(values, dict) else ""
        )
        try:
            return parse_table(TABLES[name], values, name, allow_extra=factory)
        except ConfigError as exc:
            text = str(exc)
            if " needs " in text:
                key = text.rsplit(" needs ", 1)[1]
                text += f" (or EDGEFL_{name.upper()}_{key.upper()})"
            raise ConfigError(text) from None

    device: DeviceTable = table("device")
    broker: BrokerTable = table("broker")
    keys: KeysTable = table("keys")
    privacy: PrivacyTable = table("privacy")
    table("training")
    from edge_sdk.transport import TransportConfig

    try:
        TransportConfig.from_dict({"client_id": device.id, **broker.settings()})
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"[broker]: {exc}") from None
    return DeviceConfig(
        device_id=device.id,
        federation=device.federation,
        state_dir=Path(device.state_dir),
        broker=broker.settings(),
        public_key=Path(keys.public_key),
        fingerprint=keys.fingerprint or None,
        aggregator_key=_hex_key(keys.aggregator_key),
        policy=Path(keys.policy) if keys.policy else None,
        policy_digest=keys.policy_digest or None,
        budget_epsilon=privacy.budget_epsilon,
        delta=privacy.delta,
        training=dict(doc.get("training", {})),
        resend_initial_s=device.resend_initial_s,
        resend_max_s=device.resend_max_s,
        model_fetch_s=device.model_fetch_s,
        pool_target=device.pool_target,
    )
