"""Malformed and oversize messages at the real aggregator service over Mosquitto
(issue 9, cases 12 and 13).

What must hold:

* every malformed payload on an ``updates/`` topic is rejected and counted
  ONCE, acknowledged to the broker and dropped: after the service restarts
  on its durable session, nothing is redelivered (no poison-message loop);
* a publish above the broker's maximum packet size is refused by the SDK
  before it is sent (the connection stays up) and updates are chunked to
  the broker's limit instead;
* an update above the application limit is refused on the first chunk,
  before anything is buffered or parsed;
* the honest devices are unaffected: all receipted, the aggregate exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.rounds import round_outcome
from aggregator.store import AggregatorStore
from edge_sdk.protocol import Chunk, Topics
from edge_sdk.transport import MessageTooLargeError
from firmware_sim.broker import MosquittoBroker, MosquittoOptions
from tests import test_aggregator_support as _support
from tests.reliability_helpers import (
    FED,
    DeviceFleet,
    Observer,
    ServiceThread,
    malformed_payloads,
    transport,
    wait_for,
    write_federation,
)

keypair = _support.keypair  # session fixture

pytestmark = pytest.mark.broker

BROKER_MAX = 4096  # bytes: a 12-ciphertext update (6 KiB) needs several chunks
DIM = 1000


@pytest.mark.timeout(240)
def test_malformed_and_oversize_input_is_dropped_once_and_honest_devices_unaffected(
    keypair: Any, tmp_path: Path
) -> None:
    from tests.conftest import _require_mosquitto

    _require_mosquitto()
    broker = MosquittoBroker(
        workdir=tmp_path / "mosquitto", options=MosquittoOptions(max_packet_size=BROKER_MAX)
    )
    broker.start()
    fed = write_federation(
        tmp_path / "agg",
        keypair,
        broker.url,
        devices=4,
        dim=DIM,
        rounds=1,
        transport={"reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
    )
    topics = Topics(FED)
    svc = ServiceThread(fed.config).start()
    attacker = transport(broker.url, "attacker")
    attacker.connect(timeout=30)
    fleet: DeviceFleet | None = None
    try:
        # -- case 13a: the broker's limit is learned; the SDK refuses, not the broker
        assert attacker.max_message_size <= BROKER_MAX
        with pytest.raises(MessageTooLargeError):
            attacker.publish(topics.updates("d0000"), b"\0" * BROKER_MAX)
        assert attacker.connected
        # -- case 12: malformed payloads on a device's update topic
        bad = malformed_payloads("d0000")
        for payload in bad.values():
            attacker.publish(topics.updates("d0000"), payload)
        # -- case 13b: a chunk declaring more than an update of this plan
        limit = svc.machine.intake.max_update_bytes
        oversize = Chunk(
            federation=FED,
            stream="update",
            sender="d0001",
            round_id=1,
            payload_digest=bytes(32),
            payload_size=limit + 1,
            index=0,
            total=2,
            data=b"\0" * 1000,
        )
        attacker.publish(topics.updates("d0001"), oversize.to_bytes())
        assert attacker.flush(30)
        n_bad = len(bad) + 1
        wait_for(lambda: sum(svc.machine.rejections.values()) >= n_bad, what="rejections")
        decode = {r: c for r, c in svc.machine.rejections.items() if r.startswith("decode_")}
        assert sum(decode.values()) == len(bad), svc.machine.rejections
        assert svc.machine.rejections["chunk_too_large"] == 1
        assert svc.machine.intake.pending_bytes() == {}
        # honest devices, chunked to the broker's limit, all get through
        fleet = DeviceFleet(broker.url, fed.public_key, fed.identities, dim=DIM, resend_s=3.0)
        fleet.start()
        wait_for(lambda: fleet is not None and fleet.done(1) == set(fed.ids), what="receipts")
        wait_for(lambda: svc.machine.finished, what="round decrypted")
        assert all(t.max_message_size <= BROKER_MAX for t in fleet.transports)
        # the new model, chunked to the broker's limit, reaches a subscriber
        late = Observer(broker.url, "late").start()
        try:
            wait_for(lambda: any(m.version == 1 for m in late.models), what="model v1")
        finally:
            late.close()
        assert sum(svc.machine.rejections.values()) == n_bad  # nothing redelivered
    finally:
        if fleet is not None:
            fleet.stop()
        attacker.close()
        svc.stop()
    # restart on the same durable session: no malformed message comes back
    svc2 = ServiceThread(fed.config).start()
    try:
        marker = transport(broker.url, "marker")
        marker.connect(timeout=30)
        marker.publish(topics.updates("d0002"), b"\xc1")  # one more, AFTER the restart
        assert marker.flush(30)
        marker.close()
        wait_for(lambda: sum(svc2.machine.rejections.values()) >= 1, what="marker rejection")
        assert dict(svc2.machine.rejections) == {"decode_malformed": 1}
    finally:
        svc2.stop()
        broker.stop()
    store = AggregatorStore(fed.store, readonly=True)
    try:
        rec = store.round_record(1)
        assert rec is not None and rec.phase == "done"
        assert sorted(d for d, _, _ in store.accepted(1)) == sorted(fed.ids)
        np.testing.assert_array_equal(
            round_outcome(rec.result)[1],
            fleet.reference_sum(1),
        )
        assert sum(store.rejection_counts().values()) == n_bad + 1, sorted(
            store.rejection_counts().items()
        )
    finally:
        store.close()
