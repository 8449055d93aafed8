"""The fault proxy between a paho client and a real broker."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest

from firmware_sim.broker import MosquittoBroker
from firmware_sim.faults import FaultMode, FaultProxy
from tests.mqtt_client import TestClient

pytestmark = pytest.mark.broker


@pytest.fixture
def proxy(mosquitto: MosquittoBroker) -> FaultProxy:
    p = FaultProxy(mosquitto.host, mosquitto.port).start()
    yield p
    p.stop()


def _cid() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


def test_passthrough_delivers(proxy: FaultProxy, mosquitto: MosquittoBroker) -> None:
    sub = TestClient(mosquitto.host, mosquitto.port, client_id=_cid()).connect()
    dev = TestClient(proxy.host, proxy.port, client_id=_cid()).connect()
    try:
        sub.subscribe("p/#")
        dev.publish("p/x", b"through the proxy")
        assert sub.expect().payload == b"through the proxy"
        assert proxy.stats().bytes_upstream > 0
        assert proxy.stats().bytes_downstream > 0
    finally:
        dev.close()
        sub.close()


def test_blackhole_is_detected_and_healing_delivers(
    proxy: FaultProxy, mosquitto: MosquittoBroker
) -> None:
    keepalive = 2
    sub = TestClient(mosquitto.host, mosquitto.port, client_id=_cid()).connect()
    dev = TestClient(proxy.host, proxy.port, client_id=_cid(), keepalive=keepalive).connect()
    try:
        sub.subscribe("dev/#")
        proxy.blackhole()
        cut = time.monotonic()
        # paho notices a dead link only through missing PINGRESPs.
        assert dev.disconnected.wait(6 * keepalive), "dead link never detected"
        detected_after = dev.disconnect_times[-1] - cut
        assert detected_after >= keepalive * 0.5  # it was the keepalive, not a reset
        # paho queues a QoS 1 publish made while disconnected (rc 4) and
        # sends it after reconnecting; wait_for_publish() would raise here.
        dev.publish("dev/update", b"queued while down", wait=False)
        assert proxy.stats().bytes_dropped > 0
        proxy.heal()
        assert dev.connected.wait(20), "no reconnect after healing"
        got = sub.expect(10)
        assert got.payload == b"queued while down"
        assert dev.connect_count >= 2
    finally:
        dev.close()
        sub.close()


def test_connection_blackholed_once_stays_dead(proxy: FaultProxy) -> None:
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
        proxy.blackhole()
        sock.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\x00\x00")
        time.sleep(0.2)
        proxy.heal()
        sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            sock.recv(4)  # the CONNECT was swallowed: no CONNACK ever
    with socket.create_connection((proxy.host, proxy.port), timeout=2) as fresh:
        fresh.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\x00\x00")
        fresh.settimeout(5)
        assert fresh.recv(4)[:1] == b"\x20"  # new connections pass again


def test_reset_drops_connections_and_refuses_new_ones(
    proxy: FaultProxy, mosquitto: MosquittoBroker
) -> None:
    dev = TestClient(proxy.host, proxy.port, client_id=_cid(), keepalive=30).connect()
    try:
        proxy.reset()
        assert dev.disconnected.wait(5), "reset did not close the connection"
        with socket.create_connection((proxy.host, proxy.port), timeout=2) as sock:
            sock.settimeout(2)
            try:
                data = sock.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b""
        proxy.heal()
        assert dev.connected.wait(20)
        assert proxy.stats().connections_reset >= 2
    finally:
        dev.close()


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_latency_delays_each_direction() -> None:
    server, _ = _echo_server()
    with server, FaultProxy("127.0.0.1", server.getsockname()[1]) as proxy:
        proxy.latency(0.3)
        assert proxy.mode is FaultMode.LATENCY
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            # one-way latency applies both ways: at least 2 x 0.3 s round trip
            assert time.monotonic() - started >= 0.55


def test_bandwidth_cap_slows_bulk_transfer() -> None:
    server, _ = _echo_server()
    with server, FaultProxy("127.0.0.1", server.getsockname()[1]) as proxy:
        proxy.bandwidth(100_000)
        size = 100_000
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"x" * size)
            got = 0
            while got < size:
                got += len(sock.recv(65536))
            # 100 kB at 100 kB/s: at least ~0.9 s in each direction's sender
            assert time.monotonic() - started >= 0.9


def test_invalid_modes_are_rejected() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    with pytest.raises(ValueError):
        proxy.set_mode("sideways")
    with pytest.raises(ValueError, match="bandwidth_bps"):
        proxy.set_mode(FaultMode.BANDWIDTH)
    with pytest.raises(ValueError, match="latency_s"):
        proxy.latency(-1)
