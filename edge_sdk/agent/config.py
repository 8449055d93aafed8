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

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DeviceConfig", "load_device_config"]

_SECTIONS: dict[str, set[str]] = {
    "device": {"id", "federation", "state_dir", "resend_initial_s", "resend_max_s", "pool_target"},
    "broker": {
        "url",
        "protocol",
        "username",
        "password",
        "ca_file",
        "cert_file",
        "key_file",
        "keepalive",
        "max_message_size",
        "broker_max_packet_size",
        "failover_urls",
    },
    "keys": {"public_key", "fingerprint", "aggregator_key", "policy", "policy_digest"},
    "privacy": {"budget_epsilon", "delta"},
    "training": {"model", "onnx_path", "data", "classes", "features", "loss", "trainable"},
}


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
    for section, values in doc.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        unknown = set(values) - _SECTIONS[section]
        # model = "package.module:factory": the whole table goes to the factory
        factory = section == "training" and ":" in str(values.get("model", ""))
        if unknown and not factory:
            raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}")

    def need(section: str, key: str) -> Any:
        try:
            return doc[section][key]
        except KeyError:
            raise ConfigError(
                f"missing [{section}] {key} (or EDGEFL_{section.upper()}_{key.upper()})"
            ) from None

    device = doc.get("device", {})
    privacy = doc.get("privacy", {})
    try:
        config = DeviceConfig(
            device_id=str(need("device", "id")),
            federation=str(need("device", "federation")),
            state_dir=Path(str(need("device", "state_dir"))),
            broker=dict(doc.get("broker", {})),
            public_key=Path(str(need("keys", "public_key"))),
            fingerprint=doc.get("keys", {}).get("fingerprint"),
            aggregator_key=_hex_key(doc.get("keys", {}).get("aggregator_key")),
            policy=Path(str(doc["keys"]["policy"])) if doc.get("keys", {}).get("policy") else None,
            policy_digest=doc.get("keys", {}).get("policy_digest") or None,
            budget_epsilon=float(privacy.get("budget_epsilon", 8.0)),
            delta=float(privacy.get("delta", 1e-5)),
            training=dict(doc.get("training", {})),
            resend_initial_s=float(device.get("resend_initial_s", 15.0)),
            resend_max_s=float(device.get("resend_max_s", 300.0)),
            pool_target=int(device.get("pool_target", -1)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config value: {exc}") from None
    if "url" not in config.broker:
        raise ConfigError("missing [broker] url (or EDGEFL_BROKER_URL)")
    if not config.budget_epsilon > 0 or not 0 < config.delta < 1:
        raise ConfigError(
            f"[privacy] needs budget_epsilon > 0 and 0 < delta < 1, got "
            f"{config.budget_epsilon}, {config.delta}"
        )
    return config
