"""An in-process, synchronous, deterministic broker and transport for unit tests.

:class:`MemoryBroker` implements the parts of MQTT the device agent and the
aggregator rely on: topic wildcards, retained messages, QoS 0/1, clean and
resumed sessions (with the MQTT 5 session-expiry rule), last wills, manual
acknowledgements with redelivery (``dup=True``) of un-acked QoS 1 messages on
a resumed session, and the same size limit as the MQTT transport. Tests can
cut a client off (:meth:`MemoryBroker.partition` / :meth:`MemoryBroker.heal`),
drop messages (:meth:`MemoryBroker.drop_if`) and restart the broker.

Everything happens on the caller's thread, in a fixed order: a publish
returns after every delivery it caused (including the publishes made by the
handlers it ran, breadth first) is done. A handler that publishes does not
recurse: its message is queued and delivered after the handler returns.
Handlers run under the broker's lock, so a handler must not block waiting for
another thread that uses the same broker.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

from edge_sdk.transport._config import TransportConfig
from edge_sdk.transport._errors import (
    NotConnectedError,
    TransportError,
)
from edge_sdk.transport._topics import (
    checked_publish,
    max_payload_size,
    publish_packet_size,
    topic_matches,
    validate_filter,
    validate_topic,
)
from edge_sdk.transport._types import (
    ConnectionEvent,
    ConnectionListener,
    InboundMessage,
    MessageHandler,
    _Acker,
)

__all__ = ["MemoryBroker", "MemoryTransport"]

log = logging.getLogger("edge_sdk.transport")

_MEMORY_URL = "mqtt://memory.invalid"


@dataclass(slots=True)
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass(slots=True)
class _Session:
    client_id: str
    persistent: bool
    subs: dict[str, int] = field(default_factory=dict)
    pending: deque[_Message] = field(default_factory=deque)  # queued while offline
    inflight: dict[int, _Message] = field(default_factory=dict)  # sent, not acked
    next_mid: int = 1

    def new_mid(self) -> int:
        for _ in range(65_535):
            mid = self.next_mid
            self.next_mid = mid % 65_535 + 1
            if mid not in self.inflight:
                return mid
        raise TransportError(f"{self.client_id}: 65,535 messages in flight")  # pragma: no cover


class MemoryBroker:
    """A deterministic in-memory MQTT broker (see the module docstring).

    Args:
        max_packet_size: the broker's own maximum packet size (None: no limit),
            advertised to clients like an MQTT 5 CONNACK property.

    Attributes:
        dropped: ``(topic, payload)`` of every message the drop predicate ate.
        history: ``(client_id, topic, payload, retain)`` of every accepted publish.
    """

    def __init__(
        self, *, max_packet_size: int | None = None, retained_exact_only: bool = False
    ) -> None:
        self.max_packet_size = max_packet_size
        # RabbitMQ's MQTT plugin sends retained messages only to subscriptions
        # whose filter is exactly the topic (measured): emulated when True.
        self.retained_exact_only = retained_exact_only
        self._lock = threading.RLock()
        self._retained: dict[str, _Message] = {}
        self._sessions: dict[str, _Session] = {}
        self._clients: dict[str, MemoryTransport] = {}
        self._partitioned: set[str] = set()
        self._tasks: deque[Callable[[], None]] = deque()
        self._pumping = False
        self._drop: Callable[[str, bytes], bool] | None = None
        self._transports: list[MemoryTransport] = []
        self.dropped: list[tuple[str, bytes]] = []
        self.history: list[tuple[str, str, bytes, bool]] = []

    # -------------------------------------------------------------- test tools
    def transport(self, client_id: str, **settings: Any) -> MemoryTransport:
        """Return a :class:`MemoryTransport` with a config built from ``settings``."""
        config = TransportConfig(url=_MEMORY_URL, client_id=client_id, **settings)
        return MemoryTransport(self, config)

    def drop_if(self, predicate: Callable[[str, bytes], bool] | None) -> None:
        """Silently drop published messages for which ``predicate(topic, payload)`` is True.

        The publisher sees success (as with a lossy broker); dropped messages
        are recorded in :attr:`dropped`. None stops dropping.
        """
        with self._lock:
            self._drop = predicate

    def partition(self, client_id: str) -> None:
        """Cut ``client_id`` off: abnormal disconnect (its will fires), reconnects refused."""
        with self._lock:
            self._partitioned.add(client_id)
            client = self._clients.get(client_id)
            if client is not None:
                self._detach(client, abnormal=True, reason="partitioned")
            self._pump()

    def heal(self, client_id: str) -> None:
        """End a partition; a transport still wanting a connection reconnects at once."""
        with self._lock:
            self._partitioned.discard(client_id)
            for transport in list(self._waiting):
                if transport.client_id == client_id:
                    self._attach(transport)
            self._pump()

    def kick(self, client_id: str) -> None:
        """Drop ``client_id``'s connection abnormally and let it reconnect at once."""
        self.partition(client_id)
        self.heal(client_id)

    def restart(self, *, lose_retained: bool = False, lose_sessions: bool = False) -> None:
        """Simulate a broker restart: every connection drops (no wills: the broker died).

        Args:
            lose_retained: forget retained messages (Mosquitto after SIGKILL
                keeps only its last autosave).
            lose_sessions: forget persistent sessions too.
        """
        with self._lock:
            for client in list(self._clients.values()):
                self._detach(client, abnormal=False, reason="broker restarted", will=False)
            if lose_retained:
                self._retained.clear()
            if lose_sessions:
                self._sessions.clear()
            for transport in list(self._waiting):
                if transport.client_id not in self._partitioned:
                    self._attach(transport)
            self._pump()

    def retained(self, topic: str) -> bytes | None:
        """Return the retained payload of ``topic``, or None."""
        with self._lock:
            message = self._retained.get(topic)
            return None if message is None else message.payload

    def is_connected(self, client_id: str) -> bool:
        """True while a transport with ``client_id`` is connected."""
        with self._lock:
            return client_id in self._clients

    def pending(self, client_id: str) -> int:
        """Messages queued or in flight (un-acked) for ``client_id``'s session."""
        with self._lock:
            session = self._sessions.get(client_id)
            return 0 if session is None else len(session.pending) + len(session.inflight)

    # --------------------------------------------------------------- internals
    @property
    def _waiting(self) -> list[MemoryTransport]:
        return [t for t in self._transports if t._wants_connection]

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._tasks:
                self._tasks.popleft()()
        finally:
            self._pumping = False

    def _attach(self, transport: MemoryTransport) -> None:
        cid = transport.client_id
        if cid in self._partitioned or self._clients.get(cid) is transport:
            return
        old = self._clients.get(cid)
        if old is not None:  # session take-over: the old connection is closed
            self._detach(old, abnormal=True, reason="session taken over")
        cfg = transport.config
        persistent = not cfg.clean_start and (cfg.protocol != 5 or cfg.session_expiry_s > 0)
        session = self._sessions.get(cid)
        resumed = session is not None and not cfg.clean_start
        if session is None or not resumed:
            session = _Session(client_id=cid, persistent=persistent)
            self._sessions[cid] = session
        session.persistent = persistent
        self._clients[cid] = transport
        transport._attached(session_present=resumed)
        # redeliver what this session never acknowledged, then what queued up
        for mid in sorted(session.inflight):
            message = session.inflight[mid]
            self._tasks.append(partial(transport._deliver, message, mid, dup=True))
        while session.pending:
            message = session.pending.popleft()
            self._tasks.append(partial(self._send, session, message))

    def _detach(
        self, transport: MemoryTransport, *, abnormal: bool, reason: str, will: bool = True
    ) -> None:
        cid = transport.client_id
        if self._clients.get(cid) is not transport:
            return
        del self._clients[cid]
        session = self._sessions.get(cid)
        if session is not None and not session.persistent:
            del self._sessions[cid]
        transport._detached(reason)
        if abnormal and will and transport.config.will is not None:
            w = transport.config.will
            self._accept(cid, _Message(w.topic, w.payload, w.qos, w.retain))

    def _accept(self, sender: str, message: _Message) -> None:
        drop = self._drop
        if drop is not None and drop(message.topic, message.payload):
            self.dropped.append((message.topic, message.payload))
            return
        self.history.append((sender, message.topic, message.payload, message.retain))
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in list(self._sessions.values()):
            granted = [q for f, q in session.subs.items() if topic_matches(f, message.topic)]
            if not granted:
                continue
            copy = _Message(message.topic, message.payload, min(message.qos, max(granted)))
            self._tasks.append(partial(self._send, session, copy))

    def _send(self, session: _Session, message: _Message) -> None:
        if self._sessions.get(session.client_id) is not session:
            return  # the session ended meanwhile
        client = self._clients.get(session.client_id)
        if client is None:
            if session.persistent and message.qos == 1:
                session.pending.append(message)
            return
        size = publish_packet_size(
            message.topic, len(message.payload), qos=message.qos, protocol=client.config.protocol
        )
        if size > client.config.max_message_size:
            return  # MQTT 5: the server drops what exceeds the client's maximum
        mid = 0
        if message.qos == 1:
            mid = session.new_mid()
            session.inflight[mid] = message
        client._deliver(message, mid, dup=False)

    def _publish(self, transport: MemoryTransport, message: _Message) -> None:
        with self._lock:
            if self._clients.get(transport.client_id) is not transport:
                raise NotConnectedError(
                    f"{transport.client_id} is not connected: message to {message.topic!r} not sent"
                )
            self._accept(transport.client_id, message)
            self._pump()

    def _subscribe(self, transport: MemoryTransport, topic_filter: str, qos: int) -> None:
        session = self._sessions.get(transport.client_id)
        if session is None or self._clients.get(transport.client_id) is not transport:
            return
        session.subs[topic_filter] = qos
        if topic_filter.startswith("$share/"):
            return  # retained messages are not sent to shared subscriptions
        if self.retained_exact_only and ("+" in topic_filter or "#" in topic_filter):
            return
        for topic in sorted(self._retained):
            if topic_matches(topic_filter, topic):
                kept = self._retained[topic]
                copy = _Message(kept.topic, kept.payload, min(kept.qos, qos), retain=True)
                self._tasks.append(partial(self._send_retained, session, copy))

    def _send_retained(self, session: _Session, message: _Message) -> None:
        client = self._clients.get(session.client_id)
        if client is None or self._sessions.get(session.client_id) is not session:
            return
        mid = 0
        if message.qos == 1:
            mid = session.new_mid()
            session.inflight[mid] = message
        client._deliver(message, mid, dup=False)

    def _unsubscribe(self, transport: MemoryTransport, topic_filter: str) -> None:
        session = self._sessions.get(transport.client_id)
        if session is not None and self._clients.get(transport.client_id) is transport:
            session.subs.pop(topic_filter, None)

    def _ack(self, transport: MemoryTransport, mid: int) -> None:
        session = self._sessions.get(transport.client_id)
        if session is not None and self._clients.get(transport.client_id) is transport:
            session.inflight.pop(mid, None)


class MemoryTransport:
    """The :class:`~edge_sdk.transport.Transport` protocol over a :class:`MemoryBroker`.

    Uses the config's client id, protocol (for size arithmetic), clean start,
    session expiry, will, maximum message size and manual-ack flag; the url,
    TLS and credentials are ignored. Handlers run synchronously on the
    thread that caused the delivery.
    """

    def __init__(self, broker: MemoryBroker, config: TransportConfig) -> None:
        self.broker = broker
        self._config = config
        self._subs: dict[str, tuple[MessageHandler, int]] = {}
        self._listeners: list[ConnectionListener] = []
        self._connected = False
        self._generation = 0
        self._wants_connection = False
        self._closed = False
        self._cond = threading.Condition(broker._lock)
        self.connect_count = 0
        with broker._lock:
            broker._transports.append(self)

    # --------------------------------------------------------------- protocol
    @property
    def config(self) -> TransportConfig:
        """The settings this transport runs with."""
        return self._config

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self._config.client_id

    @property
    def connected(self) -> bool:
        """True while attached to the broker."""
        return self._connected

    @property
    def max_message_size(self) -> int:
        """The smallest of the configured, the told and the broker's maximum packet size."""
        limits = [
            v
            for v in (
                self._config.max_message_size,
                self._config.broker_max_packet_size,
                self.broker.max_packet_size,
            )
            if v is not None
        ]
        return min(limits)

    def max_payload_size(self, topic: str, *, qos: int = 1) -> int:
        """Return the largest payload :meth:`publish` accepts for ``topic`` at ``qos``."""
        validate_topic(topic)
        return max_payload_size(
            topic, self.max_message_size, qos=qos, protocol=self._config.protocol
        )

    def connect(self, timeout: float | None = None) -> None:
        """Attach to the broker (unless partitioned: then on :meth:`MemoryBroker.heal`).

        Raises:
            NotConnectedError: partitioned and ``timeout`` is not None (it
                stays waiting for the heal).
            TransportError: the transport was closed.
        """
        broker = self.broker
        with broker._lock:
            if self._closed:
                raise TransportError("the transport is closed; create a new one")
            self._wants_connection = True
            broker._attach(self)
            broker._pump()
            if timeout is not None and not self._connected:
                raise NotConnectedError(f"{self.client_id} is partitioned from the memory broker")

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Return whether connected (a synchronous broker has nothing to wait for)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected or self._closed, timeout) and (
                self._connected
            )

    def close(self) -> None:
        """Disconnect cleanly (no will); idempotent."""
        broker = self.broker
        with broker._lock:
            if self._closed:
                return
            self._closed = True
            self._wants_connection = False
            broker._detach(self, abnormal=False, reason="closed")
            if self in broker._transports:
                broker._transports.remove(self)
            broker._pump()

    def __enter__(self) -> MemoryTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def on_connection_change(self, listener: ConnectionListener) -> None:
        """Call ``listener(event)`` after every connect and disconnect."""
        with self.broker._lock:
            self._listeners.append(listener)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish; returns after every resulting delivery ran.

        Raises:
            ValueError: invalid topic or qos.
            TypeError: payload is not bytes.
            MessageTooLargeError: over :attr:`max_message_size` (same arithmetic
                as the MQTT transport).
            NotConnectedError: not connected; nothing was queued.
        """
        data = checked_publish(
            topic, payload, qos=qos, protocol=self._config.protocol, limit=self.max_message_size
        )
        self.broker._publish(self, _Message(topic, data, qos, retain))

    def flush(self, timeout: float | None = None) -> bool:
        """Return True: a memory publish is acknowledged when it returns."""
        return True

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Route matching messages to ``handler``; retained ones are delivered at once."""
        validate_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos!r}")
        broker = self.broker
        with broker._lock:
            self._subs[topic_filter] = (handler, qos)
            if self._connected:
                broker._subscribe(self, topic_filter, qos)
                broker._pump()

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget ``topic_filter``."""
        broker = self.broker
        with broker._lock:
            if self._subs.pop(topic_filter, None) is not None:
                broker._unsubscribe(self, topic_filter)

    # --------------------------------------------------------------- internals
    def _attached(self, *, session_present: bool) -> None:
        self._connected = True
        self._generation += 1
        self.connect_count += 1
        self._cond.notify_all()
        if not session_present:
            for topic_filter, (_handler, qos) in self._subs.items():
                self.broker._subscribe(self, topic_filter, qos)
        event = ConnectionEvent(connected=True, session_present=session_present)
        self.broker._tasks.appendleft(lambda: self._notify(event))

    def _detached(self, reason: str) -> None:
        self._connected = False
        self._generation += 1
        self._cond.notify_all()
        event = ConnectionEvent(connected=False, reason=reason)
        self.broker._tasks.append(lambda: self._notify(event))

    def _notify(self, event: ConnectionEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("%s: connection listener raised", self.client_id)

    def _deliver(self, message: _Message, mid: int, *, dup: bool) -> None:
        if not self._connected:
            return  # stays in flight; redelivered on a resumed session
        generation = self._generation
        acker: _Acker | None = None
        if message.qos == 1:

            def send_ack() -> None:
                with self.broker._lock:
                    if generation == self._generation and self._connected:
                        self.broker._ack(self, mid)

            acker = _Acker(send_ack)
        inbound = InboundMessage(
            topic=message.topic,
            payload=message.payload,
            retain=message.retain,
            dup=dup,
            qos=message.qos,
            _acker=acker if self._config.manual_ack else None,
        )
        handlers = [h for f, (h, _q) in self._subs.items() if topic_matches(f, message.topic)]
        for handler in handlers:
            try:
                handler(inbound)
            except Exception:
                log.exception("%s: handler for %r raised", self.client_id, message.topic)
        if acker is not None and (not self._config.manual_ack or not handlers):
            acker()  # automatic ack after the handlers ran, as paho does

    def __repr__(self) -> str:
        return f"MemoryTransport(client_id={self.client_id!r}, connected={self._connected})"
