"""Load: 1,000 devices' updates for one round through Mosquitto into the aggregator.

Real updates (quantized, Paillier-encrypted with fresh obfuscators, Ed25519
signed; dimension 10, one ciphertext each), published from four MQTT
connections impersonating the devices (no ACL in force here: ACLs are
tested in ``test_acl_broker.py`` and ``test_security_tls.py``), into the real
aggregator service built from its config file.

"Nothing lost": every one of the 1,000 devices holds a receipt naming its
update, the store has exactly one row per device with that digest, and the
decrypted aggregate equals the exact integer sum of the 1,000 quantized
vectors. No timing is asserted (speed lives in ``edgefl bench aggregator``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.rounds import round_outcome
from aggregator.store import AggregatorStore
from firmware_sim.broker import MosquittoBroker, MosquittoOptions
from tests import test_aggregator_support as _support
from tests.reliability_helpers import DeviceFleet, ServiceThread, wait_for, write_federation

keypair = _support.keypair  # session fixture

pytestmark = [pytest.mark.broker, pytest.mark.slow]

N = 1000


@pytest.mark.timeout(600)
def test_one_thousand_devices_one_round_nothing_lost(keypair: Any, tmp_path: Path) -> None:
    from tests.conftest import _require_mosquitto

    _require_mosquitto()
    # the aggregator's queue must hold a whole round (docs/operations.md)
    broker = MosquittoBroker(
        workdir=tmp_path / "mosquitto", options=MosquittoOptions(max_queued_messages=100_000)
    )
    broker.start()
    fed = write_federation(
        tmp_path / "agg",
        keypair,
        broker.url,
        devices=N,
        dim=10,
        min_clients=10,
        max_contributors=N,
        rounds=1,
    )
    svc = ServiceThread(fed.config).start()
    fleet = DeviceFleet(
        broker.url, fed.public_key, fed.identities, dim=10, connections=4, resend_s=30.0
    )
    fleet.start()
    try:
        wait_for(lambda: len(fleet.expected(1)) == N, timeout=300, what="1,000 updates built")
        wait_for(lambda: fleet.done(1) == set(fed.ids), timeout=300, what="1,000 receipts")
        wait_for(lambda: svc.machine.finished, timeout=120, what="round decrypted")
    finally:
        fleet.stop()
        svc.stop()
        broker.stop()
    receipts = {(r.device_id, r.update_digest) for r in fleet.receipts if r.round_id == 1}
    assert {d for d, _ in receipts} == set(fed.ids)
    assert all(r.status in ("accepted", "duplicate") for r in fleet.receipts)
    store = AggregatorStore(fed.store, readonly=True)
    try:
        rows = store.accepted(1)
        assert len(rows) == N
        assert {d for d, _, _ in rows} == set(fed.ids)
        assert {dig for _, dig, _ in rows} == fleet.digests(1)
        rec = store.round_record(1)
        assert rec is not None and rec.phase == "done"
        results, released = round_outcome(rec.result)
        result = results[0]
        assert result.count == N
        np.testing.assert_array_equal(released, fleet.reference_sum(1))
    finally:
        store.close()
