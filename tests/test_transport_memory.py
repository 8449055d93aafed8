"""MemoryBroker specifics: determinism, fault tools, session rules."""

from __future__ import annotations

import pytest

from edge_sdk.transport import (
    ConnectionEvent,
    InboundMessage,
    MemoryBroker,
    MemoryTransport,
    MessageHandler,
    MessageTooLargeError,
    NotConnectedError,
    Will,
)


def test_publish_returns_after_delivery_and_handlers_do_not_recurse() -> None:
    broker = MemoryBroker()
    order: list[str] = []
    a = broker.transport("a")
    b = broker.transport("b")
    a.connect()
    b.connect()

    def on_ping(message: InboundMessage) -> None:
        order.append("ping-start")
        b.publish("pong", b"")
        order.append("ping-end")  # pong is delivered after this handler returns

    b.subscribe("ping", on_ping)
    a.subscribe("pong", lambda m: order.append("pong"))
    a.publish("ping", b"")
    assert order == ["ping-start", "ping-end", "pong"]


def test_runs_are_deterministic() -> None:
    def run() -> list[tuple[str, str, bytes, bool]]:
        broker = MemoryBroker()
        clients = [broker.transport(f"c{i}") for i in range(4)]

        def relay(client: MemoryTransport, index: int) -> MessageHandler:
            return lambda m: client.publish(f"fan/out/{index}", m.payload)

        for i, client in enumerate(clients):
            client.connect()
            client.subscribe("fan/#", lambda m: None)
            if i % 2:
                client.subscribe("fan/in", relay(client, i))
        clients[0].publish("fan/in", b"x")
        return broker.history

    assert run() == run()
    assert [h[1] for h in run()] == ["fan/in", "fan/out/1", "fan/out/3"]


def test_drop_if_loses_messages_silently() -> None:
    broker = MemoryBroker()
    got: list[InboundMessage] = []
    sub = broker.transport("sub")
    pub = broker.transport("pub")
    sub.connect()
    pub.connect()
    sub.subscribe("u/+", got.append)
    broker.drop_if(lambda topic, payload: payload == b"lost")
    pub.publish("u/1", b"lost")
    pub.publish("u/1", b"kept")
    broker.drop_if(None)
    pub.publish("u/1", b"lost")
    assert [m.payload for m in got] == [b"kept", b"lost"]
    assert broker.dropped == [("u/1", b"lost")]


def test_partitioned_client_cannot_reconnect_until_healed() -> None:
    broker = MemoryBroker()
    events: list[ConnectionEvent] = []
    dev = broker.transport("dev")
    dev.on_connection_change(events.append)
    dev.connect()
    broker.partition("dev")
    with pytest.raises(NotConnectedError):
        dev.connect(timeout=1)
    assert not broker.is_connected("dev")
    broker.heal("dev")
    assert dev.connected and broker.is_connected("dev")
    assert [e.connected for e in events] == [True, False, True]
    assert events[1].reason == "partitioned"


def test_restart_can_lose_retained_messages_and_sessions() -> None:
    broker = MemoryBroker()
    agg = broker.transport("agg", clean_start=False, session_expiry_s=60, manual_ack=True)
    got: list[InboundMessage] = []
    agg.subscribe("u/+", got.append)
    agg.connect()
    dev = broker.transport("dev", will=Will(topic="s/dev", payload=b"offline"))
    dev.connect()
    agg.publish("model", b"m1", retain=True)
    dev.publish("u/dev", b"update")
    assert broker.pending("agg") == 1  # delivered, not acked
    watcher: list[InboundMessage] = []
    broker.restart()  # the broker died: no wills
    observer = broker.transport("obs")
    observer.connect()
    observer.subscribe("s/#", watcher.append)
    assert watcher == []
    assert broker.retained("model") == b"m1"
    assert [(m.payload, m.dup) for m in got] == [(b"update", False), (b"update", True)]
    broker.restart(lose_retained=True, lose_sessions=True)
    assert broker.retained("model") is None
    assert broker.pending("agg") == 0


def test_session_take_over_closes_the_old_connection() -> None:
    broker = MemoryBroker()
    old = broker.transport("same")
    new = broker.transport("same")
    old.connect()
    new.connect()
    assert new.connected and not old.connected


def test_broker_packet_limit_applies_like_a_connack_maximum() -> None:
    broker = MemoryBroker(max_packet_size=200)
    dev = broker.transport("dev")
    dev.connect()
    assert dev.max_message_size == 200
    fits = dev.max_payload_size("t")
    dev.publish("t", b"x" * fits)
    with pytest.raises(MessageTooLargeError):
        dev.publish("t", b"x" * (fits + 1))


def test_offline_clean_session_gets_nothing_and_durable_gets_qos1_only() -> None:
    broker = MemoryBroker()
    clean = broker.transport("clean")
    durable = broker.transport("durable", clean_start=False, session_expiry_s=10)
    got_clean: list[InboundMessage] = []
    got_durable: list[InboundMessage] = []
    clean.subscribe("q/#", got_clean.append)
    durable.subscribe("q/#", got_durable.append)
    clean.connect()
    durable.connect()
    pub = broker.transport("pub")
    pub.connect()
    broker.partition("clean")
    broker.partition("durable")
    pub.publish("q/1", b"qos1")
    pub.publish("q/0", b"qos0", qos=0)
    broker.heal("clean")
    broker.heal("durable")
    assert got_clean == []
    assert [m.payload for m in got_durable] == [b"qos1"]


def test_311_session_without_clean_start_is_kept() -> None:
    broker = MemoryBroker()
    dev = broker.transport("dev", protocol=311, clean_start=False)  # 3.1.1: kept
    dev.subscribe("a", lambda m: None)
    dev.connect()
    broker.partition("dev")
    assert broker.pending("dev") == 0
    pub = broker.transport("pub")
    pub.connect()
    pub.publish("a", b"queued")
    assert broker.pending("dev") == 1
