"""Network partitions through the fault proxy, on a real Mosquitto (issue 9, cases 5 and 6).

Case 5: a real :class:`~edge_sdk.agent.DeviceAgent` loses its link (blackhole,
no RST) right as it publishes its update; the partition outlasts the
keepalive. "Nothing lost" means: the stored envelope reaches the aggregator
after healing and is counted once (one row, the envelope's digest), and the
device holds nothing else in memory while it waits (one outbox file, no
messages queued in the MQTT client).

Case 6: the aggregator's own link is blackholed while more updates arrive
than the broker will queue for it (``max_queued_messages`` small). Mosquitto
drops the excess without telling anyone; the devices see no receipt and
resend; after healing, the aggregate holds every device exactly once and
equals the reference sum.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.rounds import round_outcome
from aggregator.store import AggregatorStore
from edge_sdk.agent import AgentHooks, DeviceAgent, DeviceConfig, ModelTrainer, transport_config
from edge_sdk.crypto import save_public_key
from edge_sdk.identity import DeviceIdentity
from edge_sdk.models import SoftmaxRegression
from edge_sdk.protocol import EncryptedUpdate
from edge_sdk.transport import ConnectionEvent, MqttTransport
from firmware_sim.broker import MosquittoBroker, MosquittoOptions
from firmware_sim.faults import FaultProxy
from tests import test_aggregator_support as _support
from tests.reliability_helpers import (
    FED,
    DeviceFleet,
    ServiceThread,
    wait_for,
    write_federation,
)

keypair = _support.keypair  # session fixture

pytestmark = pytest.mark.broker

FEATURES, CLASSES = 4, 3
DIM = FEATURES * CLASSES + CLASSES
KEEPALIVE = 2


@pytest.mark.timeout(180)
def test_device_partition_longer_than_keepalive_then_heal_delivers_once(
    keypair: Any, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    pk = keypair[0]
    ident = DeviceIdentity.generate("pi-part")
    state = tmp_path / "device"
    ident.save(state / "device.key")
    fed = write_federation(
        tmp_path / "agg",
        keypair,
        mosquitto.url,
        devices=[ident],
        dim=DIM,
        min_clients=1,
        rounds=1,
        transport={"reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
    )
    svc = ServiceThread(fed.config).start()
    proxy = FaultProxy(mosquitto.host, mosquitto.port).start()
    save_public_key(pk, tmp_path / "paillier.pub", overwrite=True)
    cfg = DeviceConfig(
        device_id="pi-part",
        federation=FED,
        state_dir=state,
        broker={
            "url": proxy.url,
            "keepalive": KEEPALIVE,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 2.0,
        },
        public_key=tmp_path / "paillier.pub",
        budget_epsilon=16.0,
        resend_initial_s=0.5,
        resend_max_s=1.0,
    )
    cut_at: list[float] = []
    down_at: list[float] = []

    def cut_link(round_id: int, attempt: int) -> None:
        if not cut_at:  # the first publish goes into a dead link
            proxy.blackhole()
            cut_at.append(time.monotonic())

    rng = np.random.default_rng(3)
    trainer = ModelTrainer(
        SoftmaxRegression(FEATURES, CLASSES),
        rng.normal(size=(30, FEATURES)).astype(np.float32),
        rng.integers(0, CLASSES, size=30),
    )
    device_transport = MqttTransport(transport_config(cfg))

    def on_change(event: ConnectionEvent) -> None:
        if not event.connected and cut_at and not down_at:
            down_at.append(time.monotonic())

    device_transport.on_connection_change(on_change)
    agent = DeviceAgent(
        cfg,
        trainer,
        device_transport,
        public_key=pk,
        hooks=AgentHooks(before_publish=cut_link),
        require_privacy=False,
    )
    agent.start(connect_timeout=30)
    try:
        wait_for(lambda: bool(down_at), what="the dead link to be detected")
        detected_after = down_at[0] - cut_at[0]
        # paho notices a blackhole only through missing PINGRESPs: about
        # 1.5 keepalives; the bound is loose on purpose (shared machine)
        assert 0.5 * KEEPALIVE <= detected_after <= 4 * KEEPALIVE, detected_after
        # Before detection the link looks up: the resends of those ~3 s sit in
        # paho's retry queue (the same envelope each time). After detection the
        # device holds one sealed envelope on disk and queues NOTHING more in
        # memory however long the partition lasts: resends while disconnected
        # are refused (NotConnectedError) and retried from the outbox.
        queued = len(device_transport._unacked)
        assert queued <= 16, queued
        partition_end = time.monotonic() + 3 * KEEPALIVE
        while time.monotonic() < partition_end:
            assert len(list((state / "outbox").glob("*.update"))) == 1
            assert len(device_transport._unacked) == queued
            assert not device_transport.connected
            time.sleep(0.2)
        envelope = EncryptedUpdate.from_bytes(
            next((state / "outbox").glob("*.update")).read_bytes()
        )
        proxy.heal()
        wait_for(lambda: agent.session.outbox is None, what="receipt after healing")
        wait_for(lambda: svc.machine.finished, what="round decrypted")
        # the reconnect waits came from the jittered backoff, below its ceiling
        delays = list(device_transport.reconnect_delays)
        assert delays and all(0.0 <= d <= 2.0 for d in delays)
        ceilings = {min(2.0, 0.5 * 2**k) for k in range(8)}
        assert any(d not in ceilings for d in delays), delays
    finally:
        agent.stop()
        proxy.stop()
        svc.stop()
    store = AggregatorStore(fed.store, readonly=True)
    try:
        assert [(d, dig) for d, dig, _ in store.accepted(1)] == [
            ("pi-part", envelope.update_digest)
        ]
        assert store.round_record(1).phase == "done"  # type: ignore[union-attr]
    finally:
        store.close()


@pytest.mark.timeout(240)
def test_aggregator_partition_beyond_broker_queue_loses_nothing(
    keypair: Any, tmp_path: Path
) -> None:
    from tests.conftest import _require_mosquitto

    _require_mosquitto()
    options = MosquittoOptions(max_queued_messages=3, max_inflight_messages=2)
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", options=options)
    broker.start()
    proxy = FaultProxy(broker.host, broker.port).start()
    n = 12
    fed = write_federation(
        tmp_path / "agg",
        keypair,
        proxy.url,
        devices=n,
        rounds=1,
        transport={"reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "keepalive": KEEPALIVE},
    )
    svc = ServiceThread(fed.config).start()
    fleet = DeviceFleet(broker.url, fed.public_key, fed.identities, dim=10, resend_s=1.5)
    fleet.held = set(fed.ids)
    fleet.start()
    try:
        wait_for(lambda: fleet.expected(1) == set(fed.ids), what="updates built")
        proxy.blackhole()
        assert svc.service is not None
        agg_transport = svc.service.transport
        wait_for(lambda: not agg_transport.connected, what="aggregator sees the partition")
        fleet.held = set()  # 12 updates (and their resends) for a 2 + 3 message window
        wait_for(lambda: min(fleet.sends.get((1, d), 0) for d in fed.ids) >= 2, what="resends")
        assert fleet.done(1) == set()  # no receipt crosses a partition
        log = broker.log_text()
        assert "messages are being dropped" in log, (
            "the broker never dropped: the test proves nothing"
        )
        proxy.heal()
        wait_for(lambda: fleet.done(1) == set(fed.ids), what="every device receipted")
        wait_for(lambda: svc.machine.finished, what="round decrypted")
    finally:
        fleet.stop()
        svc.stop()
        proxy.stop()
        broker.stop()
    store = AggregatorStore(fed.store, readonly=True)
    try:
        rows = store.accepted(1)
        assert sorted(d for d, _, _ in rows) == sorted(fed.ids)
        assert {dig for _, dig, _ in rows} == fleet.digests(1)
        rec = store.round_record(1)
        assert rec is not None
        results, released = round_outcome(rec.result)
        result = results[0]
        assert result.count == n
        np.testing.assert_array_equal(released, fleet.reference_sum(1))
    finally:
        store.close()
