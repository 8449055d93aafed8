"""The broker harness for real: Mosquitto (MQTT 5 and 3.1.1) and embedded amqtt."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from edge_sdk.errors import BrokerStartError
from firmware_sim.broker import (
    EmbeddedBroker,
    MosquittoBroker,
    MosquittoOptions,
    mqtt_ping,
    start_broker,
)
from tests.mqtt_client import TestClient

pytestmark = pytest.mark.broker


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _roundtrip(host: str, port: int, *, mqtt5: bool) -> None:
    sub = TestClient(host, port, client_id=_cid("sub"), mqtt5=mqtt5).connect()
    pub = TestClient(host, port, client_id=_cid("pub"), mqtt5=mqtt5).connect()
    try:
        sub.subscribe("edgefl/test/+", qos=1)
        payload = b"\x00\x01hello\xff" * 100
        pub.publish("edgefl/test/a", payload, qos=1)
        got = sub.expect()
        assert got.topic == "edgefl/test/a"
        assert got.payload == payload
        assert got.qos == 1
    finally:
        pub.close()
        sub.close()


@pytest.mark.parametrize("mqtt5", [True, False], ids=["mqtt5", "mqtt311"])
def test_mosquitto_roundtrip(mosquitto: MosquittoBroker, mqtt5: bool) -> None:
    _roundtrip(mosquitto.host, mosquitto.port, mqtt5=mqtt5)


def test_embedded_roundtrip_mqtt311(embedded_broker: EmbeddedBroker) -> None:
    _roundtrip(embedded_broker.host, embedded_broker.port, mqtt5=False)


def test_every_broker_roundtrips_in_its_best_protocol(broker: MosquittoBroker) -> None:
    _roundtrip(broker.host, broker.port, mqtt5=broker.supports_mqtt5)


def test_embedded_refuses_mqtt5(embedded_broker: EmbeddedBroker) -> None:
    client = TestClient(embedded_broker.host, embedded_broker.port, client_id=_cid("v5"))
    with pytest.raises((TimeoutError, ConnectionError, OSError)):
        client.connect(timeout=3)
    assert embedded_broker.supports_mqtt5 is False


def test_broker_binds_loopback_on_a_free_port(broker: MosquittoBroker) -> None:
    assert broker.host == "127.0.0.1"
    assert broker.port != 1883
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert mqtt_ping(broker.host, broker.port)


def test_retained_message_survives_graceful_restart(mosquitto: MosquittoBroker) -> None:
    pub = TestClient(mosquitto.host, mosquitto.port, client_id=_cid("pub")).connect()
    pub.publish("edgefl/v1/fed/model", b"model-v7", qos=1, retain=True)
    pub.close()
    old_pid = mosquitto.pid
    mosquitto.restart(graceful=True)
    assert mosquitto.pid != old_pid
    assert (mosquitto.persistence_dir / "mosquitto.db").exists()
    sub = TestClient(mosquitto.host, mosquitto.port, client_id=_cid("sub")).connect()
    try:
        sub.subscribe("edgefl/v1/fed/model")
        got = sub.expect()
        assert got.payload == b"model-v7"
        assert got.retain is True
    finally:
        sub.close()


def test_kill_then_restart_serves_again(mosquitto: MosquittoBroker) -> None:
    client = TestClient(mosquitto.host, mosquitto.port, client_id=_cid("c"), keepalive=5).connect()
    try:
        mosquitto.kill()
        assert not mosquitto.running
        assert client.disconnected.wait(10), "client did not notice the killed broker"
        mosquitto.start()
        assert client.connected.wait(15), "client did not reconnect after restart"
        assert client.connect_count == 2
    finally:
        client.close()
    _roundtrip(mosquitto.host, mosquitto.port, mqtt5=True)


def test_snapshot_survives_kill_when_autosaved(tmp_path: Path) -> None:
    # Mosquitto's persistence is a snapshot, not a log: a retained message
    # survives SIGKILL only if an autosave ran after it (here every second).
    opts = MosquittoOptions(autosave_interval=1)
    with MosquittoBroker(workdir=tmp_path / "m", options=opts) as broker:
        assert isinstance(broker, MosquittoBroker)
        pub = TestClient(broker.host, broker.port, client_id=_cid("pub")).connect()
        pub.publish("edgefl/v1/fed/round", b"round-3", retain=True)
        pub.close()
        db = broker.persistence_dir / "mosquitto.db"
        deadline = time.monotonic() + 15
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db.exists(), "autosave never wrote the snapshot"
        broker.restart(graceful=False)
        sub = TestClient(broker.host, broker.port, client_id=_cid("sub")).connect()
        try:
            sub.subscribe("edgefl/v1/fed/round")
            assert sub.expect().payload == b"round-3"
        finally:
            sub.close()


def test_embedded_restart_serves_again(embedded_broker: EmbeddedBroker) -> None:
    port = embedded_broker.port
    embedded_broker.kill()
    assert not mqtt_ping("127.0.0.1", port, timeout=0.5)
    embedded_broker.start()
    assert embedded_broker.port == port
    _roundtrip(embedded_broker.host, port, mqtt5=False)


def test_mosquitto_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("paho")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        try:
            broker = MosquittoBroker(workdir=tmp_path / "m", port=port, start_timeout=5)
        except BrokerStartError as exc:  # mosquitto missing
            pytest.skip(str(exc))
        started = time.monotonic()
        with pytest.raises(BrokerStartError) as info:
            broker.start()
        assert time.monotonic() - started < 5.5
    message = str(info.value)
    assert f"port {port} is already in use" in message
    assert str(broker.log_path) in message
    assert not broker.running


def test_mosquitto_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    opts = MosquittoOptions(extra_lines=("no_such_option 42",))
    try:
        broker = MosquittoBroker(workdir=tmp_path / "m", options=opts, start_timeout=5)
    except BrokerStartError as exc:
        pytest.skip(str(exc))
    with pytest.raises(BrokerStartError) as info:
        broker.start()
    message = str(info.value)
    assert "no_such_option" in message
    assert str(broker.log_path) in message


def test_embedded_port_taken_is_a_clear_error() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(port=port, start_timeout=5)
        with pytest.raises(BrokerStartError, match=f"port {port} is already in use"):
            broker.start()
        assert not broker.running


def test_missing_mosquitto_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerStartError, match="mosquitto"):
        MosquittoBroker(workdir=tmp_path, executable=tmp_path / "nope").start()


def test_generated_config_carries_the_options(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    acl = tmp_path / "acl"
    opts = MosquittoOptions(
        autosave_interval=5,
        max_packet_size=4096,
        max_queued_messages=10,
        password_file=pw,
        acl_file=acl,
    )
    try:
        broker = MosquittoBroker(workdir=tmp_path / "m", options=opts)
    except BrokerStartError as exc:
        pytest.skip(str(exc))
    text = broker.config_text()
    for line in (
        "autosave_interval 5",
        "max_packet_size 4096",
        "max_queued_messages 10",
        f"password_file {pw}",
        f"acl_file {acl}",
        "allow_anonymous false",
        f"listener {broker.port} 127.0.0.1",
        f"persistence_location {broker.persistence_dir}/",
    ):
        assert line in text


def test_max_packet_size_is_enforced(tmp_path: Path) -> None:
    opts = MosquittoOptions(max_packet_size=1024)
    try:
        broker = MosquittoBroker(workdir=tmp_path / "m", options=opts)
    except BrokerStartError as exc:
        pytest.skip(str(exc))
    with broker:
        sub = TestClient(broker.host, broker.port, client_id=_cid("sub")).connect()
        pub = TestClient(broker.host, broker.port, client_id=_cid("pub")).connect()
        try:
            sub.subscribe("t/#")
            pub.publish("t/big", b"x" * 4000, qos=0, wait=False)
            pub.publish("t/small", b"ok", qos=0, wait=False)
            assert pub.disconnected.wait(10), "an oversize packet must cost the connection"
            assert "t/big" not in [m.topic for m in list(sub.messages.queue)]
        finally:
            pub.close()
            sub.close()


def test_start_broker_auto_and_options_validation() -> None:
    with pytest.raises(ValueError, match="embedded broker takes no Mosquitto options"):
        start_broker("embedded", options=MosquittoOptions())
    with pytest.raises(ValueError, match="kind must be"):
        start_broker("rabbit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_packet_size"):
        MosquittoOptions(max_packet_size=3)
    broker = start_broker("auto")
    try:
        assert mqtt_ping(broker.host, broker.port)
    finally:
        broker.stop()
