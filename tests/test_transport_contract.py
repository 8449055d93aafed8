"""The transport contract: the same behaviours against every Transport implementation.

Runs against :class:`MemoryTransport` (no broker) and :class:`MqttTransport`
on Mosquitto (MQTT 5) and on the embedded amqtt broker (MQTT 3.1.1). Each
MQTT client goes through its own :class:`FaultProxy`, so a test can reset one
client's link (no DISCONNECT: the broker publishes its will) and heal it.

Negative checks never sleep: the test publishes the message that must not
arrive, then a marker, and inspects what arrived before the marker.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from edge_sdk.transport import (
    ConnectionEvent,
    InboundMessage,
    MemoryBroker,
    MemoryTransport,
    MessageTooLargeError,
    MqttTransport,
    NotConnectedError,
    Transport,
    TransportConfig,
    Will,
)
from firmware_sim.faults import FaultProxy

WAIT = 20.0  # generous: the machine is shared; nothing asserts on time


class Inbox:
    """A subscription handler that queues what it receives."""

    def __init__(self) -> None:
        self.messages: queue.Queue[InboundMessage] = queue.Queue()

    def __call__(self, message: InboundMessage) -> None:
        self.messages.put(message)

    def get(self, timeout: float = WAIT) -> InboundMessage:
        """Return the next message (raises queue.Empty after ``timeout``)."""
        return self.messages.get(timeout=timeout)

    def until(self, marker: bytes, timeout: float = WAIT) -> list[InboundMessage]:
        """Return every message received before the one whose payload is ``marker``.

        Lets a test prove that something was NOT delivered without sleeping:
        publish the forbidden message, then a marker, and look at what came first.
        """
        seen: list[InboundMessage] = []
        while True:
            message = self.get(timeout)
            if message.payload == marker:
                return seen
            seen.append(message)

    def empty(self) -> bool:
        """True when nothing is queued right now."""
        return self.messages.empty()


class MemoryEnv:
    """The contract verbs over a :class:`MemoryBroker`."""

    name = "memory"
    mqtt5 = True
    durable = True

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.transports: list[MemoryTransport] = []

    def make(self, client_id: str, **settings: Any) -> Transport:
        transport = self.broker.transport(client_id, **settings)
        self.transports.append(transport)
        return transport

    def cut(self, transport: Transport) -> None:
        self.broker.partition(transport.client_id)
        assert not transport.connected

    def restore(self, transport: Transport) -> None:
        self.broker.heal(transport.client_id)
        assert transport.wait_connected(WAIT)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


class MqttEnv:
    """The contract verbs over a real broker (Mosquitto or the embedded one)."""

    durable = False

    def __init__(self, broker: Any, *, name: str, mqtt5: bool, durable: bool) -> None:
        self.broker = broker
        self.name = name
        self.mqtt5 = mqtt5
        self.durable = durable
        self.transports: list[MqttTransport] = []
        self.proxies: dict[str, FaultProxy] = {}

    def make(self, client_id: str, **settings: Any) -> Transport:
        proxy = FaultProxy(self.broker.host, self.broker.port).start()
        self.proxies[client_id] = proxy
        values: dict[str, Any] = {
            "url": proxy.url,
            "client_id": client_id,
            "protocol": 5 if self.mqtt5 else 311,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "keepalive": 10,
            "connect_timeout": 5.0,
        }
        values.update(settings)
        transport = MqttTransport(TransportConfig(**values))
        self.transports.append(transport)
        return transport

    def cut(self, transport: Transport) -> None:
        lost = threading.Event()
        transport.on_connection_change(lambda event: None if event.connected else lost.set())
        self.proxies[transport.client_id].reset()
        assert lost.wait(WAIT), f"{transport.client_id} never noticed the reset"
        assert not transport.connected

    def restore(self, transport: Transport) -> None:
        self.proxies[transport.client_id].heal()
        assert transport.wait_connected(WAIT), f"{transport.client_id} did not reconnect"

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        for proxy in self.proxies.values():
            proxy.stop()


Env = MemoryEnv | MqttEnv


@pytest.fixture(
    params=[
        "memory",
        pytest.param("mosquitto", marks=pytest.mark.broker),
        pytest.param("embedded", marks=pytest.mark.broker),
    ]
)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    """Each transport implementation in turn."""
    made: Env
    if request.param == "memory":
        made = MemoryEnv()
    elif request.param == "mosquitto":
        made = MqttEnv(
            request.getfixturevalue("mosquitto"), name="mosquitto", mqtt5=True, durable=True
        )
    else:
        made = MqttEnv(
            request.getfixturevalue("embedded_broker"), name="embedded", mqtt5=False, durable=False
        )
    try:
        yield made
    finally:
        made.close()


def _ids() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"pub-{tag}", f"sub-{tag}", f"t/{tag}"


def _connected(env: Env, client_id: str, **settings: Any) -> Transport:
    transport = env.make(client_id, **settings)
    transport.connect(timeout=WAIT)
    return transport


def _eventually_delivered(pub: Transport, topic: str, inbox: Inbox) -> InboundMessage:
    """Publish probes until one arrives: a (re)subscription may still be in flight.

    ``connected`` means CONNACK received; the SUBSCRIBEs the transport re-sends
    on connect can land after another client's next publish.
    """
    for attempt in range(100):
        pub.publish(topic, b"probe-%d" % attempt, qos=0)
        try:
            return inbox.get(timeout=0.3)
        except queue.Empty:
            continue
    pytest.fail(f"nothing published on {topic} reached the subscriber")


def test_round_trip_delivers_topic_payload_and_qos(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/+", inbox)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/a", b"\x00payload\xff")
    got = inbox.get()
    assert (got.topic, got.payload, got.qos, got.retain, got.dup) == (
        f"{base}/a",
        b"\x00payload\xff",
        1,
        False,
        False,
    )
    pub.publish(f"{base}/b", b"at most once", qos=0)
    got = inbox.get()
    assert got.payload == b"at most once"
    # MQTT: delivered QoS = min(publish, subscription). amqtt 0.12 upgrades to the
    # subscription's QoS (a known deviation of the embedded broker).
    assert got.qos == (1 if env.name == "embedded" else 0)
    assert pub.flush(WAIT)


def test_subscribing_before_connect_takes_effect_on_connect(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    sub = env.make(sub_id)
    sub.subscribe(f"{base}/#", inbox)
    sub.connect(timeout=WAIT)
    pub = _connected(env, pub_id)
    assert _eventually_delivered(pub, f"{base}/x", inbox).topic == f"{base}/x"


def test_retained_message_reaches_late_subscriber_and_can_be_cleared(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/model", b"v1", retain=True)
    pub.publish(f"{base}/model", b"v2", retain=True)
    assert pub.flush(WAIT)
    late = Inbox()
    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/model", late)
    got = late.get()
    assert (got.payload, got.retain) == (b"v2", True)
    pub.publish(f"{base}/model", b"", retain=True)  # empty retained payload clears it
    assert late.get().payload == b""
    assert pub.flush(WAIT)
    later = Inbox()
    other = _connected(env, sub_id + "-2")
    other.subscribe(f"{base}/#", later)
    pub.publish(f"{base}/marker", b"marker")
    assert later.until(b"marker") == []


def test_wildcards_route_only_matching_topics(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    plus, hashed = Inbox(), Inbox()
    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/updates/+", plus)
    sub2 = _connected(env, sub_id + "-h")
    sub2.subscribe(f"{base}/status/#", hashed)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/updates/d1/extra", b"too deep")
    pub.publish(f"{base}/updates/d1", b"d1")
    pub.publish(f"{base}/status/d1/x", b"deep status")
    pub.publish(f"{base}/updates/marker", b"marker")
    pub.publish(f"{base}/status/marker", b"marker")
    assert [m.payload for m in plus.until(b"marker")] == [b"d1"]
    assert [m.payload for m in hashed.until(b"marker")] == [b"deep status"]


def test_oversize_publish_is_refused_before_sending_and_link_stays_up(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/#", inbox)
    pub = _connected(env, pub_id, max_message_size=4096)
    events: list[ConnectionEvent] = []
    pub.on_connection_change(events.append)
    topic = f"{base}/big"
    fits = pub.max_payload_size(topic)
    with pytest.raises(MessageTooLargeError) as info:
        pub.publish(topic, b"x" * (fits + 1))
    assert info.value.size == 4097 and info.value.limit == 4096
    assert pub.connected
    pub.publish(topic, b"y" * fits)  # exactly at the limit: accepted
    pub.publish(f"{base}/small", b"small")
    got = [inbox.get(), inbox.get()]
    assert [(m.topic, len(m.payload)) for m in got] == [(topic, fits), (f"{base}/small", 5)]
    assert events == []  # no disconnect/reconnect cycle


def test_publish_when_not_connected_raises_and_queues_nothing(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/#", inbox)
    pub = env.make(pub_id)
    with pytest.raises(NotConnectedError):
        pub.publish(f"{base}/early", b"never sent")
    pub.connect(timeout=WAIT)
    env.cut(pub)
    with pytest.raises(NotConnectedError):
        pub.publish(f"{base}/cut", b"never sent either")
    env.restore(pub)
    pub.publish(f"{base}/marker", b"marker")
    assert inbox.until(b"marker") == []


def test_a_failing_handler_does_not_stop_delivery(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    calls: list[bytes] = []

    def explode(message: InboundMessage) -> None:
        calls.append(message.payload)
        raise RuntimeError("handler bug")

    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/boom", explode)
    sub.subscribe(f"{base}/ok", inbox)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/boom", b"1")
    pub.publish(f"{base}/ok", b"2")
    assert inbox.get().payload == b"2"
    assert calls == [b"1"]
    assert sub.connected


def test_unsubscribe_stops_delivery(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    gone, kept = Inbox(), Inbox()
    sub = _connected(env, sub_id)
    sub.subscribe(f"{base}/gone", gone)
    sub.subscribe(f"{base}/kept", kept)
    sub.unsubscribe(f"{base}/gone")
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/gone", b"x")
    pub.publish(f"{base}/kept", b"marker")
    assert kept.get().payload == b"marker"
    pub.publish(f"{base}/kept", b"marker2")  # the unsubscribe had time to land
    assert kept.get().payload == b"marker2"
    assert gone.empty()


def test_last_will_is_published_when_the_link_dies_not_on_close(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    status = Inbox()
    observer = _connected(env, sub_id)
    observer.subscribe(f"{base}/status/+", status)
    will = Will(topic=f"{base}/status/{pub_id}", payload=b"offline", qos=1, retain=False)
    dying = _connected(env, pub_id, will=will)
    env.cut(dying)
    got = status.get()
    assert (got.topic, got.payload) == (will.topic, b"offline")
    polite = _connected(env, pub_id + "-p", will=Will(topic=f"{base}/status/p", payload=b"gone"))
    polite.close()
    marker = _connected(env, pub_id + "-m")
    marker.publish(f"{base}/status/m", b"marker")
    assert status.until(b"marker") == []


def test_subscriptions_and_listeners_survive_a_lost_link(env: Env) -> None:
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    events: list[ConnectionEvent] = []
    sub = env.make(sub_id)
    sub.on_connection_change(events.append)
    sub.subscribe(f"{base}/#", inbox)
    sub.connect(timeout=WAIT)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/before", b"before")
    assert inbox.get().payload == b"before"
    env.cut(sub)
    env.restore(sub)
    assert _eventually_delivered(pub, f"{base}/after", inbox).topic == f"{base}/after"
    states = [e.connected for e in events]
    assert states[:3] == [True, False, True]
    assert events[2].session_present is False  # a clean session: resubscribed by the transport


def test_close_is_idempotent_and_final(env: Env) -> None:
    pub_id, _, base = _ids()
    pub = _connected(env, pub_id)
    pub.close()
    pub.close()
    assert not pub.connected
    with pytest.raises(NotConnectedError):
        pub.publish(f"{base}/x", b"x")
    with pytest.raises(Exception, match="closed"):
        pub.connect(timeout=1)


# ------------------------------------------------ durable sessions, manual ack


def _durable(env: Env, client_id: str) -> Transport:
    settings: dict[str, Any] = {"manual_ack": True, "clean_start": False}
    if env.mqtt5:
        settings["session_expiry_s"] = 600
    return env.make(client_id, **settings)


def test_unacked_message_is_redelivered_after_reconnect(env: Env) -> None:
    if not env.durable:
        pytest.skip(f"{env.name}: no MQTT 5 session resumption")
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    agg = _durable(env, sub_id)
    agg.subscribe(f"{base}/updates/+", inbox)
    agg.connect(timeout=WAIT)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/updates/d1", b"update-1")
    first = inbox.get()
    assert (first.payload, first.dup) == (b"update-1", False)
    # not acked (say, the store write had not finished) when the link dies
    env.cut(agg)
    first.ack()  # too late: a no-op on the dead connection
    env.restore(agg)
    again = inbox.get()
    assert (again.payload, again.dup) == (b"update-1", True)
    assert agg.connected
    again.ack()
    again.ack()  # idempotent
    pub.publish(f"{base}/updates/d1", b"marker")
    marker = inbox.get()
    assert marker.payload == b"marker"
    marker.ack()
    # a PUBACK is fire-and-forget: a round trip after it proves the broker has it
    agg.publish(f"{base}/sync", b"sync")
    assert agg.flush(WAIT)
    # acked now: another reconnect redelivers nothing
    env.cut(agg)
    env.restore(agg)
    pub.publish(f"{base}/updates/d2", b"marker2")
    rest = inbox.until(b"marker2")
    assert rest == []


def test_messages_published_while_a_durable_subscriber_is_away_are_kept(env: Env) -> None:
    if not env.durable:
        pytest.skip(f"{env.name}: no MQTT 5 session resumption")
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    events: list[ConnectionEvent] = []
    agg = _durable(env, sub_id)
    agg.on_connection_change(events.append)
    agg.subscribe(f"{base}/updates/+", inbox)
    agg.connect(timeout=WAIT)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/updates/d1", b"sync")
    inbox.get().ack()
    agg.publish(f"{base}/sync", b"sync")  # a round trip: the broker has the PUBACK
    assert agg.flush(WAIT)
    env.cut(agg)
    pub.publish(f"{base}/updates/d1", b"while away")
    assert pub.flush(WAIT)
    env.restore(agg)
    got = inbox.get()
    assert got.payload == b"while away"
    got.ack()
    assert [e.session_present for e in events if e.connected] == [False, True]


def test_automatic_ack_mode_does_not_redeliver(env: Env) -> None:
    if not env.durable:
        pytest.skip(f"{env.name}: no MQTT 5 session resumption")
    pub_id, sub_id, base = _ids()
    inbox = Inbox()
    settings: dict[str, Any] = {"clean_start": False, "session_expiry_s": 600}
    agg = env.make(sub_id, **settings)
    agg.subscribe(f"{base}/#", inbox)
    agg.connect(timeout=WAIT)
    pub = _connected(env, pub_id)
    pub.publish(f"{base}/a", b"once")
    got = inbox.get()
    got.ack()  # a no-op without manual acks
    assert got.payload == b"once"
    agg.publish(f"{base}/sync", b"sync")  # a round trip: the broker has the PUBACK
    assert agg.flush(WAIT)
    assert inbox.get().payload == b"sync"
    env.cut(agg)
    env.restore(agg)
    pub.publish(f"{base}/m", b"marker")
    assert inbox.until(b"marker") == []


def test_implementations_satisfy_the_protocol() -> None:
    broker = MemoryBroker()
    memory = broker.transport("p")
    mqtt_transport = MqttTransport(TransportConfig(url="mqtt://127.0.0.1:1", client_id="p"))
    assert isinstance(memory, Transport)
    assert isinstance(mqtt_transport, Transport)
    assert isinstance(memory, MemoryTransport)
    mqtt_transport.close()
