"""The device agent end to end over the in-memory transport, with real crypto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.agent import DeviceAgent, DeviceConfig, ModelTrainer, transport_config
from edge_sdk.crypto import (
    CiphertextVector,
    PackingSpec,
    PaillierPrivateKey,
    PaillierPublicKey,
    decrypt,
    generate_keypair,
    save_public_key,
    unpack_sum,
)
from edge_sdk.identity import DeviceRegistry
from edge_sdk.models import SoftmaxRegression
from edge_sdk.protocol import Topics
from edge_sdk.randomness import DeterministicRandom
from edge_sdk.transport import MemoryBroker, TransportConfig
from tests.agent_peer import ScriptedAggregator, wait_for

FED = "fed"
FEATURES, CLASSES = 4, 3
DIM = FEATURES * CLASSES + CLASSES


@pytest.fixture(scope="module")
def keypair() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return generate_keypair(2048)


def make_agent(
    tmp: Path, device_id: str, broker: MemoryBroker, pk: PaillierPublicKey, **kw: object
) -> DeviceAgent:
    save_public_key(pk, tmp / "paillier.pub", overwrite=True)
    cfg = DeviceConfig(
        device_id=device_id,
        federation=FED,
        state_dir=tmp / device_id,
        broker={"url": "mqtt://memory:1883"},
        public_key=tmp / "paillier.pub",
        budget_epsilon=kw.pop("budget", 16.0),
        delta=1e-5,  # type: ignore[arg-type]
        resend_initial_s=0.2,
        resend_max_s=1.0,
        aggregator_key=kw.pop("aggregator_key", None),  # type: ignore[arg-type]
        pool_target=kw.pop("pool_target", -1),  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(abs(hash(device_id)) % 2**32)
    x = rng.normal(size=(40, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=40)
    transport = broker.transport(device_id, will=transport_config(cfg).will)
    return DeviceAgent(
        cfg,
        ModelTrainer(SoftmaxRegression(FEATURES, CLASSES), x, y),
        transport,
        public_key=pk,
        rng=DeterministicRandom(device_id),
        allow_insecure_rng=True,
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture
def world(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> Iterator[tuple[MemoryBroker, ScriptedAggregator, DeviceRegistry]]:
    broker = MemoryBroker()
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    agg_t = broker.transport("aggregator")
    agg = ScriptedAggregator(agg_t, federation=FED, public_key=keypair[0], registry=registry)
    agg_t.connect(timeout=5)
    yield broker, agg, registry
    agg_t.close()


def test_devices_complete_a_round_and_the_sum_is_exact(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    broker, agg, registry = world
    pk, sk = keypair
    agents = [make_agent(tmp_path, f"d{i}", broker, pk) for i in range(3)]
    for a in agents:
        registry.enroll(a.config.device_id, a.identity.public_key_bytes)
        a.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        ann = agg.announce(1, dimension=DIM, min_clients=3)
        wait_for(lambda: len(agg.updates) == 3, what="3 updates")
        wait_for(lambda: all(a.session.outbox is None for a in agents), what="receipts")
        assert agg.rejected == []
        spec = PackingSpec.from_bytes(ann.packing)
        vectors = [
            CiphertextVector.from_bytes(u.ciphertexts, pk, u.num_ciphertexts) for u in agg.updates
        ]
        total = vectors[0]
        from edge_sdk.crypto import sum_ciphertexts

        total = sum_ciphertexts(pk, vectors)
        sums = unpack_sum(decrypt(sk, total), spec, count=3, length=DIM)
        assert sums.shape == (DIM,)
        # every device charged exactly one round in its durable ledger
        for a in agents:
            assert len(a.ledger.entries) == 1
            assert a.ledger.has_spent(f"{FED}/1")
        statuses = {s.device_id: s.state for s in agg.statuses}
        assert set(statuses) == {"d0", "d1", "d2"}
    finally:
        for a in agents:
            a.stop()


def test_exhausted_budget_skips_and_reports(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    broker, agg, registry = world
    agent = make_agent(tmp_path, "poor", broker, keypair[0], budget=0.5)
    registry.enroll("poor", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(1, dimension=DIM)
        wait_for(lambda: any(s.state == "skipped" for s in agg.statuses), what="skip status")
        skipped = [s for s in agg.statuses if s.state == "skipped"]
        assert "budget_exhausted" in skipped[0].detail
        assert agg.updates == [] and agent.ledger.entries == ()
    finally:
        agent.stop()


def test_reboot_before_receipt_resends_identical_bytes(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    broker, agg, registry = world
    agg.auto_receipt = False
    agent = make_agent(tmp_path, "rb", broker, keypair[0])
    registry.enroll("rb", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
    agg.announce(1, dimension=DIM)
    wait_for(lambda: len(agg.updates) >= 1, what="first upload")
    first = agg.raw_update_payloads[0]
    agent.stop()  # "reboot": a new agent over the same state dir
    again = make_agent(tmp_path, "rb", broker, keypair[0])
    again.start(connect_timeout=5)
    try:
        wait_for(lambda: len(agg.updates) >= 2, what="resend after reboot")
        assert agg.raw_update_payloads[-1] == first  # same noise, same ciphertexts
        assert len(again.ledger.entries) == 1  # charged once
        agg.receipt(agg.updates[-1], "accepted")
        wait_for(lambda: again.session.outbox is None, what="receipt clears outbox")
        assert not any(again.config.outbox_dir.iterdir())
    finally:
        again.stop()


def test_oversize_update_is_chunked(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    broker, agg, registry = world
    agent = make_agent(tmp_path, "chunky", broker, keypair[0])
    small = TransportConfig(url="mqtt://memory:1883", client_id="chunky", max_message_size=1300)
    agent.transport = broker.transport("chunky", max_message_size=small.max_message_size)
    registry.enroll("chunky", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(1, dimension=DIM)
        wait_for(lambda: len(agg.updates) == 1, what="chunked update")
        topic = Topics(FED).updates("chunky")
        sizes = [len(p) for (_, t, p, _) in broker.history if t == topic]
        assert len(sizes) >= 2 and max(sizes) <= 1300
    finally:
        agent.stop()


def test_he_only_round_clips_with_the_announced_clip(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    broker, agg, registry = world
    agent = make_agent(tmp_path, "he", broker, keypair[0], require_privacy=False)
    registry.enroll("he", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(
            1,
            dimension=DIM,
            noise=None,
            train=(("epochs", 3), ("lr", 1.0), ("batch_size", 8), ("clip", 0.05)),
        )
        wait_for(lambda: len(agg.updates) == 1, what="HE-only update")
        private = agent.last_private
        assert private is not None
        assert private.clipped and private.original_norm > 0.05
        assert private.clamped == 0  # clipped to the plan's clip: nothing hits the slot range
        assert agent.ledger.entries == ()  # no noise, nothing charged
    finally:
        agent.stop()


def test_pinned_aggregator_key_refuses_forged_models_rounds_and_receipts(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> None:
    from edge_sdk.identity import DeviceIdentity

    pk = keypair[0]
    broker = MemoryBroker()
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    real = DeviceIdentity.generate("aggregator")
    agg_t = broker.transport("aggregator")
    agg = ScriptedAggregator(
        agg_t, federation=FED, public_key=pk, registry=registry, identity=real, auto_receipt=False
    )
    agg_t.connect(timeout=5)
    forger_t = broker.transport("broker-insider")
    forger = ScriptedAggregator(
        forger_t, federation=FED, public_key=pk, identity=DeviceIdentity.generate("aggregator")
    )
    forger_t.connect(timeout=5)
    agent = make_agent(tmp_path, "pinned", broker, pk, aggregator_key=real.public_key_bytes)
    registry.enroll("pinned", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        wait_for(lambda: agent.session.model_version == 0, what="genuine model")
        # a forged, newer model (signed by another key) and an unsigned one
        forger.model = agg.model
        forger.publish_model(1, np.full(DIM, 9.0, dtype=np.float32))
        forger.identity = None
        forger.publish_model(2, np.full(DIM, 7.0, dtype=np.float32))
        agg.announce(1, dimension=DIM)
        wait_for(lambda: len(agg.updates) == 1, what="update for the genuine round")
        assert agent.session.model_version == 0 and agent.weights is not None
        assert float(np.abs(agent.weights).max()) == 0.0
        # a forged receipt does not clear the outbox; the genuine one does
        forger.identity = DeviceIdentity.generate("aggregator")
        forger.receipt(agg.updates[0], "accepted")
        wait_for(lambda: agent.rejected_inbound >= 3, what="forged receipt refused")
        assert agent.session.outbox is not None  # still waiting for the real one
        agg.receipt(agg.updates[0], "accepted")
        wait_for(lambda: agent.session.outbox is None, what="genuine receipt")
        assert agent.rejected_inbound >= 3
    finally:
        agent.stop()
        agg_t.close()
        forger_t.close()


def test_idle_time_fills_the_obfuscator_pool_and_the_next_round_uses_it(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    broker, agg, registry = world
    agent = make_agent(tmp_path, "pooled", broker, keypair[0], pool_target=3)
    registry.enroll("pooled", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(1, dimension=DIM)
        wait_for(lambda: len(agg.updates) == 1, what="round 1")
        wait_for(lambda: agent.pool.size() == 3, what="background fill to 3")
        agg.publish_model(1, np.zeros(DIM, dtype=np.float32))
        wait_for(lambda: agent.session.model_version == 1, what="model v1")
        agg.announce(2, dimension=DIM)
        wait_for(lambda: len(agg.updates) == 2, what="round 2")
        # one ciphertext per update: round 1 computed its obfuscator on demand
        # (empty pool), round 2 took one that idle time had precomputed
        assert agent.pool.computed_on_demand == 1
        assert agent.pool.taken_from_pool == 1
        assert agent.pool.size() <= 3
    finally:
        agent.stop()


def test_power_loss_between_ledger_and_outbox_skips_the_round_never_re_noises(
    tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey], world: tuple
) -> None:
    from edge_sdk.agent import AgentHalt, AgentHooks

    broker, agg, registry = world

    def lose_power(step: str, round_id: int) -> None:
        if step == "ledger":
            raise AgentHalt("power lost right after the ledger write")

    agent = make_agent(tmp_path, "pl", broker, keypair[0], hooks=AgentHooks(after_step=lose_power))
    registry.enroll("pl", agent.identity.public_key_bytes)
    agent.start(connect_timeout=5)
    agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
    agg.announce(1, dimension=DIM)
    wait_for(lambda: agent.error is not None, what="simulated power loss")
    agent.stop()
    assert len(agent.ledger.entries) == 1 and agg.updates == []
    rebooted = make_agent(tmp_path, "pl", broker, keypair[0])
    rebooted.start(connect_timeout=5)
    try:
        wait_for(
            lambda: any(s.state == "skipped" and "already_spent" in s.detail for s in agg.statuses),
            what="skip after reboot",
        )
        assert agg.updates == []  # nothing sent without its stored, charged envelope
        assert len(rebooted.ledger.entries) == 1  # charged once, not re-noised
    finally:
        rebooted.stop()
