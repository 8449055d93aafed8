"""Shared fixtures: real brokers started by the harness on free ports.

``mosquitto`` starts a fresh Mosquitto per test (MQTT 5 and 3.1.1);
``embedded_broker`` the in-process amqtt broker (3.1.1 only); ``broker`` is
parametrized over both. Without Mosquitto, its tests are skipped locally and
fail under CI (CI=true), where a missing broker is a broken set-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        message = "mosquitto is not installed (make test installs it when run as root)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI requires Mosquitto: {message}")
        pytest.skip(message)


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
