"""The paho-mqtt 2.x transport: the only module of edgefl that imports paho.

What it adds to paho, and why (each point was observed on this project's
machines, see the project's findings):

* **Jittered exponential reconnect.** paho's own ``reconnect_delay_set`` has
  no jitter, so a fleet reconnects in lock-step after a broker restart. paho's
  delay is set to zero and the wait happens in ``on_pre_connect`` on paho's
  network thread, drawn from :class:`~edge_sdk.transport.Backoff`.
* **The clean-start flag is explicit on every connect.** paho's default
  (``MQTT_CLEAN_START_FIRST_ONLY``) cleans the first connect of each process,
  which throws away a durable subscriber's queued messages at every restart.
* **Sizes are checked before paho sees a message.** paho ignores the broker's
  maximum packet size: one oversized QoS 1 message made it disconnect and
  reconnect in a loop, blocking everything behind it. The limit is the
  smallest of ``max_message_size``, the told ``broker_max_packet_size``
  (MQTT 3.1.1 brokers cannot say theirs) and the MQTT 5 CONNACK's.
* **An oversized publish that slipped through ends, it does not loop.** When
  the broker closes the connection twice while the same QoS 1 message,
  larger than any it ever acknowledged, is in flight (at once on an MQTT 5
  "Packet too large"), that message is dropped from paho's queue, counted in
  ``refused_oversize`` and logged, and its size minus one becomes the
  learned limit: the next publish that large raises
  :class:`MessageTooLargeError`, and callers that chunk to
  :meth:`MqttTransport.max_payload_size` cut smaller pieces.
* **A publish while disconnected raises** :class:`NotConnectedError` instead
  of paho's "rc 4 but queued anyway" (whose ``wait_for_publish`` then raises).
* **Manual acks are bound to their connection**: an ``ack()`` arriving after
  a reconnect is dropped rather than acknowledging whatever message now has
  that packet id; the broker redelivers the original with DUP set.
* Subscriptions are re-sent after every connect whose session was not resumed,
  and a re-subscription the broker refuses is sent again with a doubling
  wait (0.5 s to 30 s): a cluster that lost a node refuses some for seconds.

Threads: paho's single network thread (started by :meth:`MqttTransport.connect`)
reads, writes, reconnects and runs every handler and connection listener,
one at a time. Handlers must be quick or hand work to another thread: while
a handler runs, nothing else is read, and keepalives stall. All public
methods are thread-safe and may be called from handlers.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_sdk.errors import ConfigError
from edge_sdk.transport._backoff import Backoff, UniformSource
from edge_sdk.transport._config import TransportConfig, parse_url
from edge_sdk.transport._errors import (
    ConnectRefusedError,
    MessageTooLargeError,
    NotConnectedError,
    SubscriptionRefusedError,
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

__all__ = ["MqttTransport", "build_tls_context"]

log = logging.getLogger("edge_sdk.transport")

# A connection that stayed up this long resets the backoff to its first step;
# a connection that is refused or dropped right away keeps growing it, so a
# flapping link (e.g. kicked by an ACL) does not reconnect in a tight loop.
_STABLE_AFTER_S = 10.0
_FLUSH_POLL_S = 0.02
# Connections lost while the same over-proven message was in flight before it
# is taken for one the broker refuses (the first loss may be a real outage).
_OVERSIZE_STRIKES = 2
_PACKET_TOO_LARGE = 0x95
# Waits before re-sending a re-subscription the broker refused, doubling.
_RESUBSCRIBE_MIN_S = 0.5
_RESUBSCRIBE_MAX_S = 30.0


class _QuietAfterClose(logging.Filter):
    """Drop the two errors paho logs after every :meth:`MqttTransport.close`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (
            text.startswith("Client is not connected")
            or text.endswith("on_pre_connect: transport closing")
        )


_paho_log = logging.getLogger("edge_sdk.transport.paho")
_paho_log.addFilter(_QuietAfterClose())


class _Closing(OSError):
    """Raised from on_pre_connect to abort a reconnect when the transport closes.

    paho's network loop catches OSError around reconnect() and then checks
    whether it should stop, which it should.
    """


def build_tls_context(config: TransportConfig) -> ssl.SSLContext:
    """Return the client TLS context for an ``mqtts://`` config.

    The broker certificate must chain to ``ca_file`` and name the host of the
    url (DNS name or IP address); TLS 1.2 is the minimum. A client certificate
    is loaded when ``cert_file``/``key_file`` are set (mutual TLS).

    Raises:
        ConfigError: a file is missing or unreadable, or not PEM of the right kind.
    """
    if config.ca_file is None:
        raise ConfigError("TLS needs ca_file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load ca_file {config.ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.cert_file is not None and config.key_file is not None:
        try:
            context.load_cert_chain(config.cert_file, config.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load client certificate {config.cert_file} / key {config.key_file}: {exc}"
            ) from exc
    return context


class _Outgoing:
    """A QoS 1 publish handed to paho and not yet known to be acknowledged."""

    __slots__ = ("info", "size", "topic")

    def __init__(self, info: mqtt.MQTTMessageInfo, size: int, topic: str) -> None:
        self.info = info
        self.size = size
        self.topic = topic


class _Subscription:
    __slots__ = ("confirmed", "handler", "qos")

    def __init__(self, handler: MessageHandler, qos: int) -> None:
        self.handler = handler
        self.qos = qos
        self.confirmed = False  # SUBACKed on the current session


def _code(reason: ReasonCode | int) -> int:
    return reason if isinstance(reason, int) else int(reason.value)


def _name(reason: ReasonCode | int) -> str:
    if isinstance(reason, int):
        return str(reason)
    try:
        return str(reason.getName())
    except Exception:  # an unknown code: its number is enough
        return str(reason.value)


class MqttTransport:
    """An MQTT 5 / 3.1.1 client with the edgefl guarantees (see the module docstring).

    Args:
        config: validated settings.
        rng: uniform source for the reconnect jitter (tests inject a seeded one).

    Raises:
        ConfigError: the TLS files cannot be loaded.

    Example:
        >>> t = MqttTransport(TransportConfig(url="mqtt://127.0.0.1:1883", client_id="d1"))
        >>> t.subscribe("edgefl/v1/f/round", on_round)  # doctest: +SKIP
        >>> t.connect(timeout=10)  # doctest: +SKIP
        >>> t.publish("edgefl/v1/f/updates/d1", payload)  # doctest: +SKIP
    """

    def __init__(self, config: TransportConfig, *, rng: UniformSource | None = None) -> None:
        self._config = config
        scheme, self._host, self._port = parse_url(config.url)
        self._nodes = [parse_url(u)[1:] for u in config.urls]
        self._node = 0
        self._backoff = Backoff(
            config.reconnect_min_s, config.reconnect_max_s, jitter=config.jitter, rng=rng
        )
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._subs: dict[str, _Subscription] = {}
        self._listeners: list[ConnectionListener] = []
        self._connected = False
        self._session_present = False
        self._generation = 0
        self._broker_max: int | None = None
        self._learned_max: int | None = None
        self._proven_size = 0
        self._suspect: tuple[int, int] | None = None
        self._strikes = 0
        self._refusal: ConnectRefusedError | None = None
        self._last_reason = ""
        self._started = False
        self._closed = False
        self._closing = threading.Event()
        self._first_attempt = True
        self._retry = 0
        self._connected_at = 0.0
        self._suback: dict[int, list[ReasonCode]] = {}
        self._auto_mids: dict[int, str] = {}
        self._resub_attempts: dict[str, int] = {}
        self._suback_codes: dict[str, int] = {}
        self._unacked: list[_Outgoing] = []
        self.reconnect_delays: deque[float] = deque(maxlen=64)
        """The most recent reconnect waits, seconds (diagnostics and tests)."""
        self.connect_count = 0
        """Successful CONNACKs so far."""
        self.dropped_oversize = 0
        """Inbound messages dropped because they exceeded ``max_message_size``."""
        self.refused_publishes = 0
        """QoS 1 publishes the broker answered with a failure PUBACK (MQTT 5), e.g. ACL."""
        self.refused_oversize = 0
        """QoS 1 publishes dropped because the broker kept closing the connection on them."""
        self._client = self._make_client(scheme == "mqtts")

    # ------------------------------------------------------------------ set-up
    def _make_client(self, tls: bool) -> mqtt.Client:
        cfg = self._config
        protocol = mqtt.MQTTv5 if cfg.protocol == 5 else mqtt.MQTTv311
        extra: dict[str, Any] = {}
        if protocol == mqtt.MQTTv311:
            extra["clean_session"] = cfg.clean_start
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=protocol,
            reconnect_on_failure=True,
            manual_ack=cfg.manual_ack,
            **extra,
        )
        # our callbacks never raise; _Closing must propagate out of on_pre_connect
        client.suppress_exceptions = False
        client.enable_logger(_paho_log)
        client.reconnect_delay_set(0, 0)  # the jittered wait is ours (on_pre_connect)
        client.connect_timeout = cfg.connect_timeout
        client.max_inflight_messages_set(20)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.will is not None:
            client.will_set(
                cfg.will.topic, cfg.will.payload, qos=cfg.will.qos, retain=cfg.will.retain
            )
        if tls:
            client.tls_set_context(build_tls_context(cfg))
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _connect_properties(self) -> Properties | None:
        if self._config.protocol != 5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._config.session_expiry_s > 0:
            props.SessionExpiryInterval = self._config.session_expiry_s
        # the broker must not send us more than we accept (bounded input)
        props.MaximumPacketSize = self._config.max_message_size
        return props

    # --------------------------------------------------------------- properties
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
        """True while a connection is up."""
        with self._lock:
            return self._connected

    @property
    def node_url(self) -> str:
        """The url of the node this transport connects (or last connected) to."""
        with self._lock:
            return self._config.urls[self._node]

    @property
    def session_present(self) -> bool:
        """Whether the broker resumed a session on the latest connect."""
        with self._lock:
            return self._session_present

    @property
    def max_message_size(self) -> int:
        """The largest PUBLISH :meth:`publish` sends, bytes.

        The smallest of ``max_message_size``, ``broker_max_packet_size`` (told),
        the MQTT 5 CONNACK's Maximum Packet Size (learned) and a limit learned
        from a broker that closed the connection on an oversized message.
        """
        with self._lock:
            limits = [
                v
                for v in (
                    self._config.max_message_size,
                    self._config.broker_max_packet_size,
                    self._broker_max,
                    self._learned_max,
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

    def suback_code(self, topic_filter: str) -> int | None:
        """Return the latest SUBACK reason code for ``topic_filter`` (granted QoS or >= 0x80)."""
        with self._lock:
            return self._suback_codes.get(topic_filter)

    # ---------------------------------------------------------------- lifecycle
    def connect(self, timeout: float | None = None) -> None:
        """Start the network thread; it connects and reconnects until :meth:`close`.

        Args:
            timeout: seconds to wait for the first successful connection; None
                returns at once (use :meth:`wait_connected` or a listener).

        Raises:
            ConnectRefusedError: the broker refused the connection (the thread
                keeps retrying with backoff; call :meth:`close` to stop).
            NotConnectedError: no connection within ``timeout`` (it keeps trying).
            TransportError: the transport was closed.
        """
        with self._lock:
            if self._closed:
                raise TransportError("the transport is closed; create a new one")
            if not self._started:
                self._started = True
                self._refusal = None
                self._client.connect_async(
                    self._host,
                    self._port,
                    keepalive=self._config.keepalive,
                    # a bool, never MQTT_CLEAN_START_FIRST_ONLY: see the module docstring
                    clean_start=self._config.clean_start
                    if self._config.protocol == 5
                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=self._connect_properties(),
                )
                self._client.loop_start()
        if timeout is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._connected or self._refusal is not None, timeout)
            if self._connected:
                return
            if self._refusal is not None:
                raise self._refusal
            reason = f" (last: {self._last_reason})" if self._last_reason else ""
        raise NotConnectedError(
            f"no connection to {self._config.url} within {timeout:.1f} s{reason}; "
            "still retrying in the background"
        )

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected or self._closed, timeout) and (
                self._connected
            )

    def close(self) -> None:
        """Send DISCONNECT (the broker then discards the will) and stop the thread.

        QoS 1 messages not yet acknowledged by the broker stay unconfirmed:
        call :meth:`flush` first when that matters. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
            was_connected = self._connected
            self._connected = False
            self._generation += 1
            self._cond.notify_all()
        self._closing.set()
        if started:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client.loop_stop()
        if was_connected:
            self._notify(ConnectionEvent(connected=False, reason="closed"))

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def on_connection_change(self, listener: ConnectionListener) -> None:
        """Call ``listener(event)`` on paho's thread after every connect and disconnect."""
        with self._lock:
            self._listeners.append(listener)

    # ----------------------------------------------------------------- messages
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Hand a message to the client session.

        Returning means paho holds the message: a QoS 1 message is resent
        after a reconnect until the broker acknowledges it (for as long as this
        process lives; use :meth:`flush` to wait for that). Delivery to the
        final subscriber is confirmed only by an application receipt.

        Raises:
            ValueError: an invalid topic (wildcards, empty) or qos not 0/1.
            TypeError: payload is not bytes.
            MessageTooLargeError: the PUBLISH exceeds :attr:`max_message_size`;
                checked before paho sees it, the connection is unaffected.
            NotConnectedError: not connected; nothing was queued.
        """
        limit = self.max_message_size
        try:
            data = checked_publish(
                topic, payload, qos=qos, protocol=self._config.protocol, limit=limit
            )
        except MessageTooLargeError as exc:
            with self._lock:
                learned = self._learned_max
            if learned is not None and limit == learned:
                raise MessageTooLargeError(
                    f"{exc}; the broker {self._config.url} closed the connection on a "
                    f"{learned + 1}-byte message, so {learned} bytes is the learned limit "
                    "(set broker_max_packet_size to the broker's real one)",
                    size=exc.size,
                    limit=exc.limit,
                ) from None
            raise
        with self._lock:
            if not self._connected:
                raise NotConnectedError(
                    f"not connected to {self._config.url}: message to {topic!r} not sent"
                )
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        # MQTT_ERR_NO_CONN here means the link dropped after the check above:
        # paho has queued the message and will send it after reconnecting.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"paho refused the publish to {topic!r}: rc {info.rc}")
        if qos == 1:
            size = publish_packet_size(topic, len(data), qos=qos, protocol=self._config.protocol)
            with self._cond:
                self._unacked = [o for o in self._unacked if not _published(o.info)]
                self._unacked.append(_Outgoing(info, size, topic))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the broker has acknowledged every QoS 1 message published so far.

        Returns:
            True when all are acknowledged, False when ``timeout`` passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._unacked = [o for o in self._unacked if not _published(o.info)]
                if not self._unacked:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # paho calls on_publish (our wake-up) just BEFORE it marks the
                # message published, so a notification alone can be lost: poll too.
                step = _FLUSH_POLL_S if remaining is None else min(_FLUSH_POLL_S, remaining)
                self._cond.wait(step)

    def subscribe(
        self,
        topic_filter: str,
        handler: MessageHandler,
        qos: int = 1,
        *,
        timeout: float | None = None,
    ) -> None:
        """Route messages matching ``topic_filter`` to ``handler``.

        The subscription is kept and re-sent after every connect whose session
        was not resumed. When connected, waits for the SUBACK. Subscribing again
        to the same filter replaces its handler. Overlapping filters each get
        the message (and a broker may send one copy per subscription): keep
        filters disjoint.

        Args:
            topic_filter: MQTT filter (``+``/``#`` wildcards; ``$share/...``).
            handler: called on paho's thread with each :class:`InboundMessage`.
            qos: maximum QoS, 0 or 1.
            timeout: seconds to wait for the SUBACK (default: connect_timeout).

        Raises:
            ValueError: malformed filter or qos.
            SubscriptionRefusedError: the broker refused it (e.g. ACL); the
                subscription is forgotten.
            TransportError: connected but no SUBACK within ``timeout``.
        """
        validate_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos!r}")
        with self._lock:
            self._subs[topic_filter] = _Subscription(handler, qos)
            send_now = self._connected
        if not send_now:
            return  # on_connect sends it
        rc, mid = self._client.subscribe(topic_filter, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # the link just dropped; on_connect re-sends every subscription
        wait = self._config.connect_timeout if timeout is None else timeout
        with self._cond:
            got = self._cond.wait_for(lambda: mid in self._suback or not self._connected, wait)
            codes = self._suback.pop(mid, None)
            if codes is None:
                if got:
                    return  # disconnected meanwhile: re-sent after reconnecting
                raise TransportError(f"no SUBACK for {topic_filter!r} within {wait:.1f} s")
            code = _code(codes[0])
            self._suback_codes[topic_filter] = code
            if code >= 0x80:
                if self._subs.get(topic_filter) is not None:
                    del self._subs[topic_filter]
                raise SubscriptionRefusedError(
                    f"broker refused subscription {topic_filter!r}: {_name(codes[0])}",
                    topic_filter=topic_filter,
                    code=code,
                )
            sub = self._subs.get(topic_filter)
            if sub is not None:
                sub.confirmed = True

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget ``topic_filter`` and tell the broker (when connected)."""
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
            send = known and self._connected
        if send:
            self._client.unsubscribe(topic_filter)

    # --------------------------------------------------------- paho callbacks
    # All run on paho's network thread and must never raise (except _Closing).

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        if self._closing.is_set():
            raise _Closing("transport closing")
        with self._lock:
            if self._first_attempt:
                self._first_attempt = False
                return
            attempt = self._retry
            self._retry += 1
        if len(self._nodes) > 1:
            # the next node of the cluster; paho reads _host/_port right after this hook
            # (its public setters refuse changes while a connect is in progress)
            with self._lock:
                self._node = (self._node + 1) % len(self._nodes)
                host, port = self._nodes[self._node]
            client._host, client._port = host, port
        delay = self._backoff.delay(attempt)
        self.reconnect_delays.append(delay)
        log.debug("%s: reconnecting in %.2f s (attempt %d)", self.client_id, delay, attempt + 1)
        if self._closing.wait(delay):
            raise _Closing("transport closing")

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            message = f"broker {self._config.url} refused {self.client_id}: {_name(reason)}"
            log.warning("%s", message)
            with self._cond:
                self._refusal = ConnectRefusedError(message, code=_code(reason))
                self._last_reason = _name(reason)
                self._cond.notify_all()
            return
        with self._cond:
            if self._closed:
                return
            self._connected = True
            self._refusal = None
            self._session_present = bool(flags.session_present)
            self._generation += 1
            self._connected_at = time.monotonic()
            self.connect_count += 1
            broker_max = getattr(properties, "MaximumPacketSize", None)
            self._broker_max = int(broker_max) if isinstance(broker_max, int) else None
            if not self._session_present:
                for sub in self._subs.values():
                    sub.confirmed = False
            todo = [(f, s.qos) for f, s in self._subs.items() if not s.confirmed]
            self._cond.notify_all()
        log.info(
            "%s: connected to %s (session %s)",
            self.client_id,
            self.node_url,
            "resumed" if self._session_present else "new",
        )
        for topic_filter, qos in todo:
            rc, mid = client.subscribe(topic_filter, qos=qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._lock:
                    self._auto_mids[mid] = topic_filter
        self._notify(ConnectionEvent(connected=True, session_present=self._session_present))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = False
            self._last_reason = _name(reason)
            if was_connected:
                self._check_oversize(_code(reason))
            if was_connected and time.monotonic() - self._connected_at >= _STABLE_AFTER_S:
                self._retry = 0
            self._auto_mids.clear()
            self._cond.notify_all()
        if was_connected and not self._closed:
            log.info("%s: connection lost (%s)", self.client_id, _name(reason))
            self._notify(ConnectionEvent(connected=False, reason=_name(reason)))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            topic_filter = self._auto_mids.pop(mid, None)
            if topic_filter is None:
                self._suback[mid] = list(reason_codes)
                self._cond.notify_all()
                return
            code = _code(reason_codes[0]) if reason_codes else 0x80
            self._suback_codes[topic_filter] = code
            sub = self._subs.get(topic_filter)
            if code >= 0x80:
                attempt = self._resub_attempts.get(topic_filter, 0)
                self._resub_attempts[topic_filter] = attempt + 1
                delay = min(_RESUBSCRIBE_MAX_S, _RESUBSCRIBE_MIN_S * 2**attempt)
                log.error(
                    "%s: broker refused re-subscription %r (code 0x%02x); retrying in %.1f s",
                    self.client_id,
                    topic_filter,
                    code,
                    delay,
                )
                if sub is not None:
                    timer = threading.Timer(delay, self._resubscribe, args=(topic_filter,))
                    timer.daemon = True
                    timer.start()
            elif sub is not None:
                sub.confirmed = True
                self._resub_attempts.pop(topic_filter, None)

    def _resubscribe(self, topic_filter: str) -> None:
        """Send a refused re-subscription again (a timer thread).

        A clustered broker may refuse subscriptions for a few seconds after
        one of its nodes died (NATS answers 0x80 until its JetStream streams
        have a new leader); giving up would leave the client connected but
        deaf on that filter for good.
        """
        with self._lock:
            sub = self._subs.get(topic_filter)
            if self._closed or not self._connected or sub is None or sub.confirmed:
                return  # the next connect re-sends it anyway
            rc, mid = self._client.subscribe(topic_filter, qos=sub.qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._auto_mids[mid] = topic_filter

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        refused = reason.is_failure
        with self._cond:
            if refused:
                self.refused_publishes += 1
            else:
                for out in self._unacked:
                    if out.info.mid == mid and not _published(out.info):
                        self._proven_size = max(self._proven_size, out.size)
                        break
            self._cond.notify_all()
        if refused:
            # MQTT 5 only: e.g. Mosquitto answers 0x87 for a publish its ACL denies
            log.warning("%s: broker refused publish mid %d: %s", self.client_id, mid, _name(reason))

    def _check_oversize(self, reason_code: int) -> None:
        """After a lost connection: was it the broker refusing an oversized message?

        Called with the lock held, on paho's thread, before any reconnect.
        The suspect is the largest QoS 1 message in flight that is larger
        than every message the broker acknowledged so far; a broker that
        closes the connection on it every time (or says "Packet too large")
        is taken to refuse it.
        """
        pending = [
            o for o in self._unacked if not _published(o.info) and o.size > self._proven_size
        ]
        if not pending:
            self._suspect, self._strikes = None, 0
            return
        worst = max(pending, key=lambda o: o.size)
        key = (worst.info.mid, worst.size)
        self._strikes = self._strikes + 1 if self._suspect == key else 1
        self._suspect = key
        if reason_code != _PACKET_TOO_LARGE and self._strikes < _OVERSIZE_STRIKES:
            return
        self._suspect, self._strikes = None, 0
        self._learned_max = max(self._proven_size, worst.size - 1)
        self.refused_oversize += 1
        _drop_outgoing(self._client, worst.info)
        self._unacked.remove(worst)
        log.error(
            "%s: broker %s closed the connection while a %d-byte PUBLISH to %r was in "
            "flight%s; dropped it, and %d bytes is now the limit (tell the transport the "
            "broker's maximum packet size: broker_max_packet_size)",
            self.client_id,
            self._config.url,
            worst.size,
            worst.topic,
            " (Packet too large)" if reason_code == _PACKET_TOO_LARGE else " twice",
            self._learned_max,
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._dispatch(msg)
        except Exception:  # never let a bug kill paho's thread
            log.exception("%s: error dispatching a message", self.client_id)

    def _dispatch(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            generation = self._generation
        acker: _Acker | None = None
        if self._config.manual_ack and msg.qos == 1:
            mid = msg.mid
            acker = _Acker(lambda: self._ack(mid, generation))
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("%s: dropped a message with a non-UTF-8 topic", self.client_id)
            if acker is not None:
                acker()
            return
        payload = bytes(msg.payload)
        size = publish_packet_size(topic, len(payload), qos=msg.qos, protocol=self._config.protocol)
        if size > self._config.max_message_size:
            # MQTT 5 brokers honour our Maximum Packet Size; 3.1.1 ones cannot be told.
            self.dropped_oversize += 1
            log.warning(
                "%s: dropped a %d-byte message on %r (limit %d)",
                self.client_id,
                size,
                topic,
                self._config.max_message_size,
            )
            if acker is not None:
                acker()
            return
        with self._lock:
            handlers = [s.handler for f, s in self._subs.items() if topic_matches(f, topic)]
        message = InboundMessage(
            topic=topic,
            payload=payload,
            retain=bool(msg.retain),
            dup=bool(msg.dup),
            qos=int(msg.qos),
            _acker=acker,
        )
        if not handlers:
            # e.g. a subscription left over in a resumed session: ack it, or
            # it would block the session's in-flight window forever
            log.debug("%s: no handler for %r", self.client_id, topic)
            message.ack()
            return
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                # no ack: with manual acks the broker redelivers after a reconnect
                log.exception("%s: handler for %r raised", self.client_id, topic)

    def _ack(self, mid: int, generation: int) -> None:
        # Held across client.ack so a reconnect (which bumps the generation in
        # on_connect, under this lock) cannot slip in between check and send.
        with self._lock:
            if generation != self._generation or not self._connected:
                return
            self._client.ack(mid, 1)

    def _notify(self, event: ConnectionEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("%s: connection listener raised", self.client_id)

    def __repr__(self) -> str:
        return (
            f"MqttTransport(url={self._config.url!r}, client_id={self.client_id!r}, "
            f"connected={self.connected})"
        )


def _drop_outgoing(client: mqtt.Client, info: mqtt.MQTTMessageInfo) -> None:
    """Remove one QoS 1 message from paho's resend queue and wake its waiters.

    paho 2.x offers only ``drop_out_messages()`` (all of them); its queue is
    ``_out_messages`` under ``_out_message_mutex``, both stable through 2.x.
    The message is marked failed (``MQTT_ERR_PAYLOAD_SIZE``) and done, so
    :meth:`MqttTransport.flush` does not wait for it.
    """
    mutex = getattr(client, "_out_message_mutex", None)
    queued = getattr(client, "_out_messages", None)
    if mutex is not None and queued is not None:
        with mutex:
            queued.pop(info.mid, None)
    info.rc = MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE
    info._set_as_published()


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        # rc NO_CONN (queued while the link was down): is_published() raises
        # even after paho delivered it; paho keeps the truth in _published.
        return bool(getattr(info, "_published", False))
