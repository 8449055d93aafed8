"""The transport interface shared by the MQTT and in-memory implementations."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "ConnectionEvent",
    "ConnectionListener",
    "InboundMessage",
    "MessageHandler",
    "Transport",
]


class _Acker:
    """Sends one acknowledgement at most (thread-safe, idempotent)."""

    __slots__ = ("_done", "_lock", "_send")

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._send()


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundMessage:
    """A message delivered to a subscription handler.

    Attributes:
        topic: the topic it was published to.
        payload: its bytes (bounded by the transport's maximum message size).
        retain: True when it is a retained message delivered on subscribe.
        dup: True when the broker is redelivering it (it may have been seen
            before: handlers must be idempotent).
        qos: the delivery QoS (0 or 1).
    """

    topic: str
    payload: bytes
    retain: bool = False
    dup: bool = False
    qos: int = 0
    _acker: _Acker | None = field(default=None, repr=False, compare=False)

    def ack(self) -> None:
        """Acknowledge the message to the broker (manual-ack mode, QoS 1).

        A no-op without manual acks, for QoS 0, when called twice, and when
        the connection it arrived on has gone: the broker then redelivers
        the message on the resumed session (``dup=True``), and the new copy
        is acknowledged instead. Thread-safe.
        """
        if self._acker is not None:
            self._acker()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEvent:
    """A change of the connection state, given to connection listeners.

    Attributes:
        connected: True after a successful CONNACK, False after the link went.
        session_present: the broker resumed an existing session (queued
            messages follow; subscriptions were kept).
        reason: why the state changed (a reason code's name, ``"closed"``...).
    """

    connected: bool
    session_present: bool = False
    reason: str = ""


MessageHandler = Callable[[InboundMessage], None]
ConnectionListener = Callable[[ConnectionEvent], None]


@runtime_checkable
class Transport(Protocol):
    """What the device agent and the aggregator need from MQTT.

    Guarantees: ``publish`` either hands the message to the client session
    (returns) or raises, never drops it silently; subscriptions survive
    reconnects; handlers run one at a time on the transport's own thread.
    """

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        ...

    @property
    def connected(self) -> bool:
        """True while a connection is up (CONNACK received, not yet lost)."""
        ...

    @property
    def max_message_size(self) -> int:
        """The effective PUBLISH size limit: the configured one or the broker's, if smaller."""
        ...

    def connect(self, timeout: float | None = None) -> None:
        """Start connecting (and reconnecting forever, until :meth:`close`).

        Args:
            timeout: seconds to wait for the first connection; None returns at once.

        Raises:
            ConnectRefusedError: the broker refused (credentials, ACL...).
            NotConnectedError: no connection within ``timeout`` (it keeps trying).
        """
        ...

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected; return False when ``timeout`` passed first."""
        ...

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop; idempotent."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Hand a message to the session, or raise.

        Raises:
            MessageTooLargeError: the PUBLISH would exceed the size limit.
            NotConnectedError: not connected; nothing was queued.
        """
        ...

    def max_payload_size(self, topic: str, *, qos: int = 1) -> int:
        """Return the largest payload :meth:`publish` accepts for ``topic``."""
        ...

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; kept across reconnects."""
        ...

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter``."""
        ...

    def on_connection_change(self, listener: ConnectionListener) -> None:
        """Register ``listener`` for every connect and disconnect."""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every QoS 1 publish so far is acknowledged by the broker."""
        ...
