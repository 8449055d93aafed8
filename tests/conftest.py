"""Shared fixtures: real brokers started by the harness on free ports.

``mosquitto`` starts a fresh Mosquitto per test (MQTT 5 and 3.1.1);
``embedded_broker`` the in-process amqtt broker (3.1.1 only); ``broker`` is
parametrized over both. ``nats_cluster`` starts three clustered
``nats-server`` nodes per test (MQTT 3.1.1 on JetStream); ``rabbitmq`` one
RabbitMQ node with the MQTT plugin per session (its start takes 10-30 s).
Without a broker binary, its tests are skipped locally and fail under CI
(CI=true), where a missing broker is a broken set-up.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto
from firmware_sim.broker_nats import NatsCluster, find_nats_server
from firmware_sim.broker_rabbitmq import (
    RabbitMQBroker,
    RabbitMQOptions,
    find_epmd,
    find_rabbitmq_server,
)


def _require(found: bool, name: str) -> None:
    """Skip (locally) or fail (CI=true) when the broker binary ``name`` is absent."""
    if found:
        return
    message = f"{name} is not installed (make test installs it when run as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI requires {name}: {message}")
    pytest.skip(message)


def _require_mosquitto() -> None:
    _require(find_mosquitto() is not None, "mosquitto")


def require_nats() -> None:
    """Skip or fail (CI) without ``nats-server``."""
    _require(find_nats_server() is not None, "nats-server")


def require_rabbitmq() -> None:
    """Skip or fail (CI) without ``rabbitmq-server`` (and Erlang's epmd)."""
    _require(find_rabbitmq_server() is not None and find_epmd() is not None, "rabbitmq-server")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running Mosquitto on a free port with persistence under tmp_path."""
    _require_mosquitto()
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three clustered nats-server nodes (MQTT + JetStream, replicas 3) on free ports."""
    require_nats()
    cluster = NatsCluster(workdir=tmp_path / "nats")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQBroker]:
    """The harness's own RabbitMQ node (MQTT plugin), one per session.

    Anonymous clients are refused: connect as ``options.username`` with
    ``options.password``. Tests sharing the node use their own federation
    names (the key holders' durable sessions outlive a test).
    """
    require_rabbitmq()
    options = RabbitMQOptions(username="edgefl", password=secrets.token_urlsafe(18))
    broker = RabbitMQBroker(workdir=tmp_path_factory.mktemp("rabbitmq"), options=options)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The embedded amqtt broker on a free port."""
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """Each harness broker in turn."""
    if request.param == "mosquitto":
        _require_mosquitto()
        broker: MosquittoBroker | EmbeddedBroker = MosquittoBroker(workdir=tmp_path / "mosquitto")
    else:
        broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
