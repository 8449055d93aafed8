"""The NATS and RabbitMQ harness configurations, and client failover between brokers.

The configurations are checked as text (no broker needed): every listener
on 127.0.0.1 free ports, never the machine's brokers, and the settings
docs/transport.md names. Failover runs against two real Mosquittos.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from edge_sdk.errors import BrokerStartError
from edge_sdk.transport import InboundMessage, MqttTransport, TransportConfig
from firmware_sim.broker import MosquittoBroker
from firmware_sim.broker_nats import NatsCluster, NatsOptions
from firmware_sim.broker_rabbitmq import RabbitMQBroker, RabbitMQOptions
from tests.conftest import _require_mosquitto, require_nats, require_rabbitmq

SYSTEM_PORTS = {1883, 4222, 4369, 5672, 25672}


def test_nats_nodes_route_to_each_other_on_free_loopback_ports(tmp_path: Path) -> None:
    require_nats()
    cluster = NatsCluster(workdir=tmp_path, options=NatsOptions(ack_wait_s=5, replicas=3))
    ports = [p for n in cluster.nodes for p in (n.client_port, n.cluster_port, n.port)]
    assert len(set(ports)) == 9 and not set(ports) & SYSTEM_PORTS
    routes = [n.cluster_port for n in cluster.nodes]
    text = cluster.nodes[1].config_text(cluster.options, routes)
    for line in (
        "server_name: n2",
        f"listen: 127.0.0.1:{cluster.nodes[1].client_port}",
        f'  store_dir: "{tmp_path / "n2-store"}"',
        f"  listen: 127.0.0.1:{cluster.nodes[1].port}",
        '  ack_wait: "5s"',
        "  stream_replicas: 3",
        "  consumer_replicas: 3",
    ):
        assert line in text.splitlines()
    assert all(f"nats-route://127.0.0.1:{p}" in text for p in routes)


def test_nats_refuses_more_replicas_than_nodes(tmp_path: Path) -> None:
    require_nats()
    with pytest.raises(ValueError, match="replicas"):
        NatsCluster(workdir=tmp_path, size=2, options=NatsOptions(replicas=3))


def test_missing_binaries_are_a_clear_start_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_NATS_SERVER", str(tmp_path / "absent"))
    monkeypatch.setenv("EDGEFL_RABBITMQ_SERVER", str(tmp_path / "absent"))
    with pytest.raises(BrokerStartError, match="nats-server is not installed"):
        NatsCluster(workdir=tmp_path)
    with pytest.raises(BrokerStartError, match="rabbitmq-server is not installed"):
        RabbitMQBroker(workdir=tmp_path)


def test_rabbitmq_node_is_isolated_from_the_machines_node(tmp_path: Path) -> None:
    require_rabbitmq()
    node = RabbitMQBroker(
        workdir=tmp_path, options=RabbitMQOptions(prefetch=500, username="u", password="p")
    )
    lines = node.config_text().splitlines()
    assert "listeners.tcp = none" in lines  # no AMQP listener at all
    assert f"mqtt.listeners.tcp.default = 127.0.0.1:{node.port}" in lines
    assert "mqtt.prefetch = 500" in lines and "mqtt.allow_anonymous = false" in lines
    assert not {node.port, node.dist_port, node.epmd_port} & SYSTEM_PORTS
    env = node._env()
    assert env["RABBITMQ_NODENAME"].startswith("edgefl-") and env["RABBITMQ_NODENAME"] != (
        "rabbit@localhost"
    )
    assert env["HOME"] == str(tmp_path / "home")  # own Erlang cookie
    assert env["ERL_EPMD_PORT"] == str(node.epmd_port)
    assert env["RABBITMQ_CONF_ENV_FILE"] == str(tmp_path / "rabbitmq-env.conf")
    assert env["RABBITMQ_MNESIA_BASE"] == str(tmp_path / "mnesia")
    with pytest.raises(ValueError, match="go together"):
        RabbitMQOptions(username="u")


@pytest.mark.broker
def test_client_fails_over_to_the_next_url_and_back(tmp_path: Path) -> None:
    _require_mosquitto()
    first = MosquittoBroker(workdir=tmp_path / "a")
    second = MosquittoBroker(workdir=tmp_path / "b")
    first.start()
    second.start()
    got = threading.Event()

    def on_message(msg: InboundMessage) -> None:
        got.set()

    client = MqttTransport(
        TransportConfig(
            url=first.url,
            failover_urls=(second.url,),
            client_id=f"fo-{uuid.uuid4().hex[:8]}",
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
        )
    )
    try:
        client.subscribe("fo/x", on_message)
        client.connect(timeout=10)
        assert client.node_url == first.url
        first.kill()
        deadline = time.monotonic() + 20  # the loss is noticed on paho's thread
        while not (client.connected and client.node_url == second.url):
            assert time.monotonic() < deadline, "no failover to the second url"
            time.sleep(0.02)
        assert client.connect_count == 2
        client.publish("fo/x", b"on the second node")  # re-subscribed there
        assert got.wait(10)
    finally:
        client.close()
        first.stop()
        second.stop()
