"""A device that never got the retained model asks for it again (session rule 6).

Two brokers behave so (measured, docs/transport.md): RabbitMQ's MQTT plugin
sends retained messages only to subscriptions whose filter is exactly the
topic, so a device subscribing ``model/+`` after the model was published
gets nothing; a NATS cluster that lost a node can lose a live subscription
(seen in CI: a device never got model v1 and every later round missed its
quorum). The in-memory broker emulates the first (``retained_exact_only``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_sdk.agent.session import (
    Connected,
    DeviceSession,
    FetchModel,
    ModelReceived,
    Phase,
    RoundReceived,
    Started,
    Tick,
)
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey
from edge_sdk.identity import DeviceRegistry
from edge_sdk.protocol import Topics
from edge_sdk.transport import MemoryBroker
from tests.agent_peer import ScriptedAggregator, wait_for
from tests.test_agent_memory import DIM, FED, make_agent
from tests.test_agent_memory import keypair as keypair  # the module's key fixture
from tests.test_agent_session import ann, model


def _late_device(tmp_path: Path, pk: PaillierPublicKey, fetch_ms: int):  # type: ignore[no-untyped-def]
    broker = MemoryBroker(retained_exact_only=True)
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    agg_t = broker.transport("aggregator")
    agg = ScriptedAggregator(agg_t, federation=FED, public_key=pk, registry=registry)
    agg_t.connect(timeout=5)
    # the model in small chunks (several exact topics), by a second publisher
    pub_t = broker.transport("model-publisher", max_message_size=1100)
    pub = ScriptedAggregator(pub_t, federation=FED, public_key=pk, registry=registry)
    pub_t.connect(timeout=5)
    agg.model = pub.publish_model(0, np.zeros(DIM, dtype=np.float32))
    assert broker.retained(Topics(FED).model(1)) is not None  # a model of several chunks
    agg.announce(1, dimension=DIM, min_clients=1)
    agent = make_agent(tmp_path, "d0", broker, pk)  # connects after all of it
    agent.session.model_fetch_ms = fetch_ms
    registry.enroll("d0", agent.identity.public_key_bytes)
    return broker, agg, agent


def test_a_late_device_gets_the_model_from_exact_topics_and_trains(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> None:
    _broker, agg, agent = _late_device(tmp_path, keypair[0], fetch_ms=200)
    agent.start(connect_timeout=5)
    try:
        wait_for(lambda: len(agg.updates) == 1, what="the late device's update")
        assert agent.model is not None and agent.model.version == 0
        assert agent.model_fetches >= 1
        assert agent._exact_model == set()  # the exact subscriptions are gone again
    finally:
        agent.stop()


def test_without_the_fetch_the_late_device_waits_for_ever(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> None:
    _broker, agg, agent = _late_device(tmp_path, keypair[0], fetch_ms=3_600_000)
    agent.start(connect_timeout=5)
    try:
        wait_for(lambda: agent.session.phase is Phase.WAITING_FOR_MODEL, what="waiting")
        time.sleep(1.0)
        assert agent.model is None and agg.updates == [] and agent.model_fetches == 0
    finally:
        agent.stop()


def test_session_asks_again_with_a_doubling_wait_only_while_waiting_and_connected() -> None:
    s = DeviceSession(
        device_id="d0",
        federation=FED,
        resend_initial_ms=1000,
        resend_max_ms=8000,
        model_fetch_ms=1000,
    )
    s.handle(Started(now_ms=0, model_version=None))
    s.handle(RoundReceived(now_ms=0, announcement=ann(1, version=0, deadline=10**6)))
    assert s.phase is Phase.WAITING_FOR_MODEL
    assert s.handle(Tick(now_ms=5000)) == []  # not connected: nothing to ask
    s.handle(Connected(now_ms=5000))
    got = s.handle(Tick(now_ms=5000))
    assert got == [FetchModel(version=0, attempt=1)]
    assert s.handle(Tick(now_ms=6000)) == []  # the next ask waits 2 s
    assert s.handle(Tick(now_ms=7000)) == [FetchModel(version=0, attempt=2)]
    assert s.handle(Tick(now_ms=10_999)) == []
    assert s.handle(Tick(now_ms=11_000)) == [FetchModel(version=0, attempt=3)]
    assert s.handle(Tick(now_ms=19_000)) == [FetchModel(version=0, attempt=4)]  # capped at 8 s
    s.handle(ModelReceived(now_ms=19_500, model=model(0)))
    assert s.phase is not Phase.WAITING_FOR_MODEL
    assert all(not isinstance(a, FetchModel) for a in s.handle(Tick(now_ms=10**6)))


def test_no_second_copy_while_a_model_is_arriving(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> None:
    agent = make_agent(tmp_path, "d0", MemoryBroker(), keypair[0])
    agent._last_model_chunk = time.monotonic()  # a chunk came a moment ago
    agent._fetch_model(FetchModel(version=0, attempt=1))
    assert agent.model_fetches == 0 and agent._exact_model == set()
    agent._last_model_chunk -= agent.config.model_fetch_s + 1  # quiet for model_fetch_s
    agent._fetch_model(FetchModel(version=0, attempt=2))
    assert agent.model_fetches == 1 and agent._exact_model == {Topics(FED).model(0)}
