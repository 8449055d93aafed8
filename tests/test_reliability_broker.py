"""Broker faults on a real Mosquitto with the real aggregator service (issue 9, cases 3 and 4).

"Nothing lost" here means: every device that sent an update holds a receipt
naming it, the store has exactly one accepted row per device with that
update's digest, and the decrypted aggregate equals the exact integer sum of
the devices' quantized vectors (computed independently by the fleet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.rounds import round_outcome
from aggregator.store import AggregatorStore
from edge_sdk.transport import MqttTransport
from firmware_sim.broker import MosquittoBroker
from tests import test_aggregator_support as _support
from tests.reliability_helpers import (
    FED,
    DeviceFleet,
    Observer,
    ServiceThread,
    transport,
    wait_for,
    write_federation,
)
from tests.test_transport_contract import Inbox

keypair = _support.keypair  # session fixture

pytestmark = pytest.mark.broker

FAST = {"reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "keepalive": 5}


def _check_round(store_path: Path, fleet: DeviceFleet, round_id: int) -> None:
    """Every receipted update is in the store once; the aggregate is the reference."""
    store = AggregatorStore(store_path, readonly=True)
    try:
        rec = store.round_record(round_id)
        assert rec is not None and rec.phase == "done", rec
        rows = store.accepted(round_id)
        assert sorted(d for d, _, _ in rows) == sorted(fleet.expected(round_id))
        assert {dig for _, dig, _ in rows} == fleet.digests(round_id)
        results, released = round_outcome(rec.result)
        result = results[0]
        assert result.count == len(fleet.expected(round_id))
        np.testing.assert_array_equal(released, fleet.reference_sum(round_id))
    finally:
        store.close()


@pytest.mark.timeout(180)
def test_broker_kill9_mid_round_devices_resend_and_model_is_republished(
    keypair: Any, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    fed = write_federation(
        tmp_path / "agg", keypair, mosquitto.url, devices=8, rounds=1, transport=FAST
    )
    svc = ServiceThread(fed.config).start()
    fleet = DeviceFleet(mosquitto.url, fed.public_key, fed.identities, dim=10, resend_s=1.0)
    fleet.held = set(fed.ids[4:])  # half the fleet sends before the crash
    fleet.start()
    try:
        wait_for(lambda: fleet.done(1) == set(fed.ids[:4]), what="first half receipted")
        mosquitto.kill()  # SIGKILL: no snapshot was ever written (autosave 1800 s)
        fleet.held = set()  # the rest try while the broker is down, then resend
        mosquitto.start()  # same port, same configuration
        # a device that (re)subscribes now gets the round and model the aggregator
        # re-published on reconnect: the killed broker came back without them
        late = Observer(mosquitto.url, "late-subscriber").start()
        try:
            wait_for(lambda: bool(late.announcements) and bool(late.models), what="retained")
            assert late.announcements[0].round_id == 1
            assert late.models[0].version == 0
        finally:
            late.close()
        wait_for(lambda: fleet.done(1) == set(fed.ids), what="every device receipted")
        wait_for(lambda: svc.machine.finished, what="round 1 decrypted")
    finally:
        fleet.stop()
        svc.stop()
    _check_round(fed.store, fleet, 1)


@pytest.mark.timeout(120)
def test_graceful_restart_keeps_durable_session_queue_and_retained(
    mosquitto: MosquittoBroker,
) -> None:
    """SIGTERM restart: the aggregator's offline queue and the retained model survive."""
    topics = f"edgefl/v1/{FED}"
    durable = {"clean_start": False, "session_expiry_s": 3600, "manual_ack": True}
    inbox = Inbox()
    agg: MqttTransport = transport(mosquitto.url, "agg-durable", **durable)
    agg.subscribe(f"{topics}/updates/+", lambda m: (inbox(m), m.ack()))
    agg.connect(timeout=30)
    publisher = transport(mosquitto.url, "publisher")
    publisher.connect(timeout=30)
    publisher.publish(f"{topics}/model/0", b"model v3", retain=True)
    assert publisher.flush(30)
    agg.close()  # DISCONNECT; the session (expiry 1 h) keeps queueing for it
    for i in range(5):
        publisher.publish(f"{topics}/updates/d{i}", f"update {i}".encode())
    assert publisher.flush(30)
    publisher.close()

    mosquitto.restart(graceful=True)  # Mosquitto writes its snapshot on SIGTERM

    agg2 = transport(mosquitto.url, "agg-durable", **durable)
    agg2.subscribe(f"{topics}/updates/+", lambda m: (inbox(m), m.ack()))
    agg2.connect(timeout=30)
    retained = Inbox()
    reader = transport(mosquitto.url, "reader")
    reader.subscribe(f"{topics}/model/+", retained)
    reader.connect(timeout=30)
    try:
        assert agg2.session_present
        got = sorted(inbox.get(30).payload for _ in range(5))
        assert got == sorted(f"update {i}".encode() for i in range(5))
        assert retained.get(30).payload == b"model v3"
    finally:
        agg2.close()
        reader.close()
