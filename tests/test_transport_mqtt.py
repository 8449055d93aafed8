"""MqttTransport behaviours that need a real broker: restarts, sessions, limits, TLS."""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_sdk.errors import ConfigError
from edge_sdk.transport import (
    Backoff,
    ConnectionEvent,
    InboundMessage,
    MqttTransport,
    NotConnectedError,
    TransportConfig,
)
from firmware_sim.broker import (
    EmbeddedBroker,
    MosquittoBroker,
    MosquittoOptions,
    TlsListener,
    free_port,
)
from firmware_sim.faults import FaultProxy
from tests.pki_helpers import make_pki
from tests.test_transport_contract import WAIT, Inbox

pytestmark = pytest.mark.broker

Broker = MosquittoBroker | EmbeddedBroker


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _config(url: str, client_id: str, **settings: Any) -> TransportConfig:
    values: dict[str, Any] = {
        "url": url,
        "client_id": client_id,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout": 5.0,
    }
    values.update(settings)
    return TransportConfig(**values)


@pytest.fixture
def transports() -> Iterator[list[MqttTransport]]:
    """Collects transports made by a test and closes them afterwards."""
    made: list[MqttTransport] = []
    yield made
    for transport in made:
        transport.close()


def _make(made: list[MqttTransport], config: TransportConfig, **kw: Any) -> MqttTransport:
    transport = MqttTransport(config, **kw)
    made.append(transport)
    return transport


def _protocol(broker: Broker) -> int:
    return 5 if broker.supports_mqtt5 else 311


def _eventually(pub: MqttTransport, topic: str, inbox: Inbox) -> InboundMessage:
    for attempt in range(100):
        pub.publish(topic, b"probe-%d" % attempt, qos=0)
        try:
            return inbox.get(timeout=0.3)
        except queue.Empty:
            continue
    pytest.fail(f"nothing on {topic} reached the subscriber")


# ------------------------------------------------------------------ restarts


def test_reconnects_and_resubscribes_after_broker_kill_and_restart(
    broker: Broker, transports: list[MqttTransport]
) -> None:
    proto = _protocol(broker)
    inbox = Inbox()
    events: list[ConnectionEvent] = []
    sub = _make(transports, _config(broker.url, _cid("sub"), protocol=proto))
    sub.on_connection_change(events.append)
    sub.subscribe("r/+", inbox)
    sub.connect(timeout=WAIT)
    pub = _make(transports, _config(broker.url, _cid("pub"), protocol=proto))
    pub.connect(timeout=WAIT)
    assert _eventually(pub, "r/before", inbox).topic == "r/before"
    broker.kill()
    broker.start()
    assert sub.wait_connected(WAIT) and pub.wait_connected(WAIT)
    assert _eventually(pub, "r/after", inbox).topic == "r/after"
    assert [e.connected for e in events][:3] == [True, False, True]
    assert sub.connect_count >= 2
    assert len(sub.reconnect_delays) >= 1  # the wait came from our backoff


def test_durable_subscriber_gets_what_queued_while_its_process_was_gone(
    mosquitto: MosquittoBroker, transports: list[MqttTransport]
) -> None:
    # A "process restart": a brand-new MqttTransport with the same client id.
    # Its FIRST connect must not clean the session (paho's default would).
    agg_id = _cid("agg")
    durable = {"clean_start": False, "session_expiry_s": 3600, "manual_ack": True}
    inbox = Inbox()
    first = _make(transports, _config(mosquitto.url, agg_id, **durable))
    first.subscribe("u/+", inbox)
    first.connect(timeout=WAIT)
    dev = _make(transports, _config(mosquitto.url, _cid("dev")))
    dev.connect(timeout=WAIT)
    dev.publish("u/d1", b"stored")
    got = inbox.get()
    got.ack()
    dev.publish("u/d1", b"unacked")
    assert inbox.get().payload == b"unacked"  # received, never acked
    first.publish("sync/agg", b"s")  # round trip: the first PUBACK reached the broker
    assert first.flush(WAIT)
    first.close()
    dev.publish("u/d2", b"while away")
    assert dev.flush(WAIT)

    later = Inbox()
    second = _make(transports, _config(mosquitto.url, agg_id, **durable))
    second.subscribe("u/+", later)
    second.connect(timeout=WAIT)
    assert second.session_present
    payloads = []
    for _ in range(2):
        message = later.get()
        payloads.append((message.payload, message.dup))
        message.ack()
    assert payloads == [(b"unacked", True), (b"while away", False)]


def test_clean_start_device_does_not_resume_a_session(
    mosquitto: MosquittoBroker, transports: list[MqttTransport]
) -> None:
    dev_id = _cid("dev")
    one = _make(transports, _config(mosquitto.url, dev_id))
    one.connect(timeout=WAIT)
    one.close()
    two = _make(transports, _config(mosquitto.url, dev_id))
    two.connect(timeout=WAIT)
    assert two.session_present is False


# -------------------------------------------------------------------- backoff


class _Recording(random.Random):
    """A seeded Random that also records what it drew."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[float] = []

    def random(self) -> float:
        value = super().random()
        self.draws.append(value)
        return value


def test_reconnect_waits_come_from_the_jittered_backoff(transports: list[MqttTransport]) -> None:
    dead_port = free_port()  # nothing listens: every attempt fails at once
    rng = _Recording(11)
    cfg = _config(f"mqtt://127.0.0.1:{dead_port}", _cid("dev"))
    cfg = TransportConfig.from_dict(
        {
            "url": cfg.url,
            "client_id": cfg.client_id,
            "reconnect_min_s": 0.002,
            "reconnect_max_s": 0.02,
        }
    )
    transport = _make(transports, cfg, rng=rng)
    transport.connect()
    deadline = time.monotonic() + WAIT
    while len(transport.reconnect_delays) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    transport.close()
    delays = list(transport.reconnect_delays)
    assert len(delays) >= 8
    reference = Backoff(0.002, 0.02, rng=random.Random(11))
    expected = [reference.delay(attempt) for attempt in range(len(delays))]
    assert delays == pytest.approx(expected, rel=0, abs=0)
    ceilings = [reference.ceiling(a) for a in range(len(delays))]
    assert ceilings[:5] == [0.002, 0.004, 0.008, 0.016, 0.02]
    assert [d / c for d, c in zip(delays, ceilings, strict=True)] == pytest.approx(
        rng.draws[: len(delays)]
    )
    assert not transport.connected


def test_connect_timeout_then_background_connect_after_heal(
    mosquitto: MosquittoBroker, transports: list[MqttTransport]
) -> None:
    with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
        proxy.reset()  # refuses connections
        dev = _make(transports, _config(proxy.url, _cid("dev"), reconnect_max_s=0.2))
        with pytest.raises(NotConnectedError, match="still retrying"):
            dev.connect(timeout=0.5)
        proxy.heal()
        assert dev.wait_connected(WAIT)
        dev.close()


# ---------------------------------------------------------------- size limits


def test_broker_maximum_packet_size_is_learned_and_exact(tmp_path: Path) -> None:
    options = MosquittoOptions(max_packet_size=1000)
    small = MosquittoBroker(workdir=tmp_path / "m", options=options)
    with small:
        made: list[MqttTransport] = []
        try:
            inbox = Inbox()
            sub = _make(made, _config(small.url, _cid("sub")))
            sub.subscribe("big/#", inbox)
            sub.connect(timeout=WAIT)
            pub = _make(made, _config(small.url, _cid("pub")))
            pub.connect(timeout=WAIT)
            assert pub.max_message_size == 1000  # from the CONNACK, below our 128 KiB
            fits = pub.max_payload_size("big/x")
            pub.publish("big/x", b"f" * fits)
            assert len(inbox.get().payload) == fits
            with pytest.raises(Exception, match="over the 1000-byte limit"):
                pub.publish("big/x", b"f" * (fits + 1))
            assert pub.connected and pub.connect_count == 1
        finally:
            for transport in made:
                transport.close()
        # Independent check against the broker with bare paho (no size check):
        # what we accept Mosquitto accepts. Mosquitto 2.0.11 compares
        # remaining length + 1 (not the whole packet, as MQTT 5 says) with its
        # maximum, so its real boundary lies up to the varint's length (<= 4
        # bytes) above ours: the transport is exact by the spec, and safe.
        assert not _raw_publish_is_refused(small, "big/x", fits)
        assert _raw_publish_is_refused(small, "big/x", fits + 4)


def _raw_publish_is_refused(broker: MosquittoBroker, topic: str, size: int) -> bool:
    """Publish with bare paho; True when Mosquitto drops the connection for it."""
    dropped = threading.Event()
    acked = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=_cid("raw"),
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.on_disconnect = lambda *args: dropped.set()
    client.on_publish = lambda *args: acked.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, b"r" * size, qos=1)
        while not (dropped.is_set() or acked.is_set()):
            time.sleep(0.01)
        return dropped.is_set() and not acked.is_set()
    finally:
        client.disconnect()
        client.loop_stop()


def test_inbound_messages_over_the_limit_are_not_delivered(
    broker: Broker, transports: list[MqttTransport]
) -> None:
    proto = _protocol(broker)
    inbox = Inbox()
    sub = _make(transports, _config(broker.url, _cid("sub"), protocol=proto, max_message_size=1024))
    sub.subscribe("in/#", inbox)
    sub.connect(timeout=WAIT)
    pub = _make(transports, _config(broker.url, _cid("pub"), protocol=proto))
    pub.connect(timeout=WAIT)
    _eventually(pub, "in/warmup", inbox)
    pub.publish("in/big", b"b" * 4000)
    pub.publish("in/m", b"marker")
    assert [m.topic for m in inbox.until(b"marker")] == []
    if proto == 311:  # 3.1.1 cannot tell the broker: the transport drops it
        assert sub.dropped_oversize == 1


# ---------------------------------------------------------------- concurrency


def test_concurrent_publishers_lose_nothing(
    broker: Broker, transports: list[MqttTransport]
) -> None:
    proto = _protocol(broker)
    inbox = Inbox()
    sub = _make(transports, _config(broker.url, _cid("sub"), protocol=proto))
    sub.subscribe("c/#", inbox)
    sub.connect(timeout=WAIT)
    pub = _make(transports, _config(broker.url, _cid("pub"), protocol=proto))
    pub.connect(timeout=WAIT)
    _eventually(pub, "c/warmup", inbox)

    def worker(index: int) -> None:
        for n in range(50):
            pub.publish(f"c/{index}", f"{index}:{n}".encode())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pub.flush(WAIT)
    seen = {inbox.get().payload for _ in range(200)}
    assert seen == {f"{i}:{n}".encode() for i in range(4) for n in range(50)}


def test_close_from_inside_a_handler_does_not_deadlock(
    broker: Broker, transports: list[MqttTransport]
) -> None:
    proto = _protocol(broker)
    closed = threading.Event()
    sub = _make(transports, _config(broker.url, _cid("sub"), protocol=proto))

    def close_me(message: InboundMessage) -> None:
        sub.close()
        closed.set()

    sub.subscribe("x/#", close_me)
    sub.connect(timeout=WAIT)
    pub = _make(transports, _config(broker.url, _cid("pub"), protocol=proto))
    pub.connect(timeout=WAIT)
    for _ in range(100):
        pub.publish("x/1", b"bye", qos=0)
        if closed.wait(0.3):
            break
    assert closed.is_set()
    assert not sub.connected


# ------------------------------------------------------------------------ TLS


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Any]]:
    """Mosquitto with a mutual-TLS listener and a throw-away PKI."""
    pki = make_pki(tmp_path / "pki")
    server = pki.issue("broker", server=True, hosts=("127.0.0.1", "localhost"))
    options = MosquittoOptions(
        tls=TlsListener(certfile=server.cert, keyfile=server.key, cafile=pki.ca_cert)
    )
    try:
        broker = MosquittoBroker(workdir=tmp_path / "m", options=options)
    except Exception as exc:  # mosquitto missing: the conftest policy applies
        pytest.skip(str(exc))
    broker.start()
    try:
        yield broker, pki
    finally:
        broker.stop()


def test_mutual_tls_round_trip(
    tls_broker: tuple[MosquittoBroker, Any], transports: list[MqttTransport]
) -> None:
    broker, pki = tls_broker
    assert broker.tls_url is not None
    inbox = Inbox()
    ids = []
    for role in ("agg", "dev"):
        cid = _cid(role)
        issued = pki.issue(cid)
        cfg = _config(
            broker.tls_url,
            cid,
            ca_file=str(pki.ca_cert),
            cert_file=str(issued.cert),
            key_file=str(issued.key),
        )
        ids.append(_make(transports, cfg))
    agg, dev = ids
    agg.subscribe("tls/#", inbox)
    agg.connect(timeout=WAIT)
    dev.connect(timeout=WAIT)
    got = _eventually(dev, "tls/hello", inbox)
    assert got.topic == "tls/hello"


def test_tls_client_without_certificate_is_refused(
    tls_broker: tuple[MosquittoBroker, Any], transports: list[MqttTransport]
) -> None:
    broker, pki = tls_broker
    assert broker.tls_url is not None
    anonymous = _make(transports, _config(broker.tls_url, _cid("anon"), ca_file=str(pki.ca_cert)))
    with pytest.raises(NotConnectedError):
        anonymous.connect(timeout=3)
    assert anonymous.connect_count == 0


def test_tls_refuses_a_broker_signed_by_another_ca(
    tls_broker: tuple[MosquittoBroker, Any], tmp_path: Path, transports: list[MqttTransport]
) -> None:
    broker, pki = tls_broker
    assert broker.tls_url is not None
    other = make_pki(tmp_path / "other", name="someone else's CA")
    issued = pki.issue("dev-x")
    cfg = _config(
        broker.tls_url,
        "dev-x",
        ca_file=str(other.ca_cert),
        cert_file=str(issued.cert),
        key_file=str(issued.key),
    )
    wrong_ca = _make(transports, cfg)
    with pytest.raises(NotConnectedError):
        wrong_ca.connect(timeout=3)
    assert wrong_ca.connect_count == 0


def test_missing_tls_files_are_a_config_error(tmp_path: Path) -> None:
    cfg = TransportConfig(
        url="mqtts://127.0.0.1:8883", client_id="d", ca_file=str(tmp_path / "nope")
    )
    with pytest.raises(ConfigError, match="ca_file"):
        MqttTransport(cfg)
