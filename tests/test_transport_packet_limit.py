"""The broker's packet limit over MQTT 3.1.1: told, or learned from a refusal, never a loop.

Mosquitto with a small ``max_packet_size`` stands in for every broker that
closes the connection on a larger packet without saying why (3.1.1 has no
way to): RabbitMQ, NATS, hosted brokers.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_sdk.transport import (
    InboundMessage,
    MessageTooLargeError,
    MqttTransport,
    TransportConfig,
    publish_packet_size,
)
from firmware_sim.broker import MosquittoBroker, MosquittoOptions
from tests.conftest import _require_mosquitto

pytestmark = pytest.mark.broker

LIMIT = 1000
WAIT = 20.0


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """Mosquitto refusing packets over LIMIT bytes."""
    _require_mosquitto()
    broker = MosquittoBroker(
        workdir=tmp_path / "m", options=MosquittoOptions(max_packet_size=LIMIT)
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _transport(broker: MosquittoBroker, name: str, **settings: object) -> MqttTransport:
    return MqttTransport(
        TransportConfig(
            url=broker.url,
            client_id=f"{name}-{uuid.uuid4().hex[:8]}",
            protocol=311,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
            **settings,  # type: ignore[arg-type]
        )
    )


def _inbox(broker: MosquittoBroker, topic_filter: str) -> tuple[MqttTransport, queue.Queue[bytes]]:
    got: queue.Queue[bytes] = queue.Queue()

    def on_message(msg: InboundMessage) -> None:
        got.put(msg.payload)

    sub = _transport(broker, "sub")
    sub.subscribe(topic_filter, on_message)
    sub.connect(timeout=WAIT)
    return sub, got


def test_told_limit_on_311_is_kept_and_the_connection_stays_up(
    small_broker: MosquittoBroker,
) -> None:
    sub, got = _inbox(small_broker, "t/#")
    pub = _transport(small_broker, "pub", broker_max_packet_size=LIMIT)
    try:
        pub.connect(timeout=WAIT)
        assert pub.max_message_size == LIMIT  # told: below the 128 KiB default
        fits = pub.max_payload_size("t/x")
        assert publish_packet_size("t/x", fits, qos=1, protocol=311) <= LIMIT
        pub.publish("t/x", b"f" * fits)
        assert got.get(timeout=WAIT) == b"f" * fits
        with pytest.raises(MessageTooLargeError, match=f"over the {LIMIT}-byte limit"):
            pub.publish("t/x", b"f" * (fits + 1))
        pub.publish("t/x", b"after")
        assert got.get(timeout=WAIT) == b"after"
        assert pub.connected and pub.connect_count == 1 and pub.refused_oversize == 0
    finally:
        pub.close()
        sub.close()


def test_untold_oversize_publish_becomes_an_error_not_a_reconnect_loop(
    small_broker: MosquittoBroker,
) -> None:
    sub, got = _inbox(small_broker, "t/#")
    pub = _transport(small_broker, "pub")  # not told: 3.1.1 cannot learn the limit
    try:
        pub.connect(timeout=WAIT)
        assert pub.max_message_size == 128 * 1024
        pub.publish("t/x", b"s" * 100)  # proves 100-byte messages pass
        assert got.get(timeout=WAIT) == b"s" * 100
        assert pub.flush(WAIT)
        pub.publish("t/x", b"b" * 4000)  # passes our check, the broker drops the link
        assert pub.flush(WAIT), "the refused message must leave the resend queue"
        assert pub.refused_oversize == 1
        big = publish_packet_size("t/x", 4000, qos=1, protocol=311)
        assert pub.max_message_size == big - 1  # learned
        assert pub.wait_connected(WAIT)
        with pytest.raises(MessageTooLargeError, match="learned limit"):
            pub.publish("t/x", b"b" * 4000)
        pub.publish("t/x", b"after")
        assert got.get(timeout=WAIT) == b"after"
        assert got.empty()  # the oversized message never arrived
        # first connect + one resend of the big message + the connect after the drop
        assert pub.connect_count == 3
        assert pub.flush(WAIT) and pub.connect_count == 3
    finally:
        pub.close()
        sub.close()


def test_mqtt5_learns_the_limit_and_a_told_smaller_one_wins(
    small_broker: MosquittoBroker,
) -> None:
    five = MqttTransport(
        TransportConfig(url=small_broker.url, client_id=f"five-{uuid.uuid4().hex[:8]}")
    )
    told = MqttTransport(
        TransportConfig(
            url=small_broker.url,
            client_id=f"told-{uuid.uuid4().hex[:8]}",
            broker_max_packet_size=600,
        )
    )
    try:
        five.connect(timeout=WAIT)
        told.connect(timeout=WAIT)
        assert five.max_message_size == LIMIT  # from the CONNACK
        assert told.max_message_size == 600
        with pytest.raises(MessageTooLargeError):
            told.publish("t/x", b"x" * 700)
        assert told.connected and told.connect_count == 1
    finally:
        five.close()
        told.close()
