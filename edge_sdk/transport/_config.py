"""Transport configuration: validated, frozen, buildable from a TOML table.

Safe defaults: MQTT 5, QoS 1 everywhere, 128 KiB maximum message (some hosted
brokers cap messages there), full-jitter reconnect backoff from 1 s to 60 s,
a clean session for devices. A durable subscriber (the aggregator) sets
``clean_start=False`` and a non-zero ``session_expiry_s`` so the broker keeps
its queued updates while it is away.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from edge_sdk.errors import ConfigError
from edge_sdk.transport._topics import validate_topic

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "TransportConfig",
    "Will",
    "parse_url",
]

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_CLIENT_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
_MAX_SESSION_EXPIRY = 0xFFFFFFFF


def parse_url(url: str) -> tuple[str, str, int]:
    """Split a broker URL into ``(scheme, host, port)``.

    Accepts ``mqtt://host[:port]`` (default port 1883) and ``mqtts://host[:port]``
    (default 8883); IPv6 hosts in brackets. Credentials, paths and queries are
    refused: credentials belong in ``username``/``password``, never in a URL
    that ends up in logs.

    Raises:
        ConfigError: anything else, with the reason.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError(f"broker url must be a non-empty string, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid broker url {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"broker url for host {parts.hostname!r} contains credentials; "
            "use the username/password settings instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker url {url!r} must not have a path, query or fragment")
    host = parts.hostname
    if not host:
        raise ConfigError(f"broker url {url!r} has no host")
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    if not 0 < port < 65_536:
        raise ConfigError(f"broker url {url!r}: port must be 1..65535")
    return scheme, host, port


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    """The last will: published by the broker when the client vanishes without DISCONNECT.

    A clean :meth:`~edge_sdk.transport.Transport.close` does not trigger it.

    Attributes:
        topic: where the broker publishes it (e.g. the device's status topic).
        payload: its bytes.
        qos: 0 or 1.
        retain: keep it as the topic's retained message (presence).
    """

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        try:
            validate_topic(self.topic)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"will topic: {exc}") from exc
        if not isinstance(self.payload, bytes):
            raise ConfigError(f"will payload must be bytes, got {type(self.payload).__name__}")
        if self.qos not in (0, 1):
            raise ConfigError(f"will qos must be 0 or 1, got {self.qos!r}")
        if not isinstance(self.retain, bool):
            raise ConfigError(f"will retain must be a bool, got {self.retain!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Will:
        """Build from a mapping; a str payload is encoded as UTF-8.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"will must be a table, got {type(data).__name__}")
        unknown = set(data) - {"topic", "payload", "qos", "retain"}
        if unknown:
            raise ConfigError(f"unknown will settings: {', '.join(sorted(unknown))}")
        if "topic" not in data:
            raise ConfigError("will needs a topic")
        values = dict(data)
        if isinstance(values.get("payload"), str):
            values["payload"] = values["payload"].encode("utf-8")
        return cls(**values)


def _fspath_or_none(value: object, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            return text
    raise ConfigError(f"{name} must be a path, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportConfig:
    """How to reach the broker and how to behave on a bad link.

    Attributes:
        url: ``mqtt://host:port`` or ``mqtts://host:port``.
        failover_urls: other nodes of the same clustered broker (same
            scheme). After a lost or failed connection the transport tries
            the next url in turn (``url`` first), so a client whose node dies
            resumes its session on another node. Empty: ``url`` only.
        client_id: the MQTT client id (printable ASCII, no spaces, 1-256
            characters). A durable subscriber needs the same id on every start.
        protocol: 5 (MQTT 5, default) or 311 (MQTT 3.1.1).
        username: broker user name (optional).
        password: broker password (needs ``username``).
        ca_file: CA bundle that signs the broker certificate; required for
            ``mqtts``. The broker's host name (or IP) is verified against it.
        cert_file: client certificate for mutual TLS (with ``key_file``).
        key_file: the client certificate's private key.
        keepalive: seconds between PINGREQs on an idle link; a dead link is
            noticed after about 1.5 x keepalive. Also bounds the wait for CONNACK.
        clean_start: start a fresh session on EVERY connect (True) or resume
            the broker-side session on every connect (False; never paho's
            "clean the first connect only").
        session_expiry_s: MQTT 5: how long the broker keeps the session after
            the connection closes; must be > 0 when ``clean_start`` is False.
            Ignored with 3.1.1 (the broker keeps a non-clean session).
        will: the last will, or None.
        reconnect_min_s: first backoff ceiling, seconds.
        reconnect_max_s: largest backoff ceiling, seconds.
        jitter: full jitter: each wait is uniform in [0, ceiling]. Without it
            a fleet reconnects in lock-step after a broker restart.
        max_message_size: largest PUBLISH packet sent or accepted, bytes
            (topic, headers and payload included).
        broker_max_packet_size: the broker's own maximum packet size, bytes,
            when the broker cannot say it: an MQTT 3.1.1 CONNACK carries no
            limit, and a broker that meets a larger packet just closes the
            connection. Outbound packets are kept to the smallest of this,
            ``max_message_size`` and (MQTT 5) the CONNACK's Maximum Packet
            Size. None: not told (MQTT 5 learns it from the CONNACK).
        connect_timeout: seconds for the TCP connect and TLS handshake.
        manual_ack: inbound QoS 1 messages are acknowledged only when the
            handler calls :meth:`InboundMessage.ack` (an aggregator acks after
            the update is durably stored).
    """

    url: str
    client_id: str
    failover_urls: tuple[str, ...] = ()
    protocol: int = 5
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    clean_start: bool = True
    session_expiry_s: int = 0
    will: Will | None = None
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    jitter: bool = True
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    broker_max_packet_size: int | None = None
    connect_timeout: float = 10.0
    manual_ack: bool = False

    def __post_init__(self) -> None:
        scheme, _host, _port = parse_url(self.url)
        failover: object = self.failover_urls
        if isinstance(failover, list):
            object.__setattr__(self, "failover_urls", tuple(failover))
        if not isinstance(self.failover_urls, tuple):
            raise ConfigError(f"failover_urls must be a list of urls, got {self.failover_urls!r}")
        for other in self.failover_urls:
            if parse_url(other)[0] != scheme:
                raise ConfigError(
                    f"failover url {other!r} must use the scheme of url ({scheme}://): "
                    "every node of a cluster is reached the same way"
                )
        if not isinstance(self.client_id, str) or not _CLIENT_ID_RE.fullmatch(self.client_id):
            raise ConfigError(
                f"client_id must be 1-256 printable ASCII characters without spaces, "
                f"got {self.client_id!r}"
            )
        if self.protocol not in (5, 311) or isinstance(self.protocol, bool):
            raise ConfigError(f"protocol must be 5 or 311, got {self.protocol!r}")
        for name in ("username", "password"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string or None")
        if self.password is not None and self.username is None:
            raise ConfigError("a password needs a username")
        for name in ("ca_file", "cert_file", "key_file"):
            object.__setattr__(self, name, _fspath_or_none(getattr(self, name), name))
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together (mutual TLS needs both)")
        if scheme == "mqtts" and self.ca_file is None:
            raise ConfigError("an mqtts:// url needs ca_file (the CA that signs the broker)")
        if scheme == "mqtt" and (self.ca_file or self.cert_file):
            raise ConfigError("TLS files are set but the url is mqtt:// (plain text); use mqtts://")
        _check_int(self.keepalive, "keepalive", 1, 65_535)
        for name in ("clean_start", "jitter", "manual_ack"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_int(self.session_expiry_s, "session_expiry_s", 0, _MAX_SESSION_EXPIRY)
        if self.protocol == 5 and not self.clean_start and self.session_expiry_s == 0:
            raise ConfigError(
                "clean_start=False needs session_expiry_s > 0 with MQTT 5: with 0 the broker "
                "discards the session when the connection closes, so nothing is resumed"
            )
        if self.will is not None and not isinstance(self.will, Will):
            raise ConfigError(f"will must be a Will, got {type(self.will).__name__}")
        _check_float(self.reconnect_min_s, "reconnect_min_s", positive=True)
        _check_float(self.reconnect_max_s, "reconnect_max_s", positive=True)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError(
                f"reconnect_max_s ({self.reconnect_max_s}) must be >= reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        _check_int(self.max_message_size, "max_message_size", 64, 268_435_460)
        if self.broker_max_packet_size is not None:
            _check_int(self.broker_max_packet_size, "broker_max_packet_size", 64, 268_435_460)
        _check_float(self.connect_timeout, "connect_timeout", positive=True)

    @property
    def urls(self) -> tuple[str, ...]:
        """``url`` followed by ``failover_urls``: the order connections are tried in."""
        return (self.url, *self.failover_urls)

    @property
    def tls(self) -> bool:
        """True for an ``mqtts://`` url."""
        return parse_url(self.url)[0] == "mqtts"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransportConfig:
        """Build from a mapping such as a TOML ``[broker]`` table.

        ``will`` may be a nested table (``topic``, ``payload`` as a string,
        ``qos``, ``retain``). Unknown keys are refused, so a typo is not
        silently ignored.

        Raises:
            ConfigError: unknown keys, missing ``url``/``client_id`` or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"transport settings must be a table, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown transport settings: {', '.join(sorted(unknown))}")
        missing = {"url", "client_id"} - set(data)
        if missing:
            raise ConfigError(f"transport settings need: {', '.join(sorted(missing))}")
        values = dict(data)
        will = values.get("will")
        if will is not None and not isinstance(will, Will):
            values["will"] = Will.from_dict(will)
        for name in ("reconnect_min_s", "reconnect_max_s", "connect_timeout"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigError(f"invalid transport settings: {exc}") from exc


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_float(value: object, name: str, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
