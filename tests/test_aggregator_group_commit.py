"""Group commit (issue 18): accepted updates committed in batches, receipts only after.

Over the in-memory broker: a batch is one transaction; no device holds a
receipt for an update that is not yet durable; a failed batch commit sends
nothing and leaves every message of the batch unacknowledged (redelivered,
counted once); ``commit_batch = 1`` keeps one transaction per update. The
SIGKILL tests inside a batch are in ``test_reliability_group_commit.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import commit_settings
from aggregator.rounds import PersistAccepted
from aggregator.service import AggregatorService
from aggregator.store import AggregatorStore, StoreError
from edge_sdk.errors import ConfigError
from edge_sdk.transport import MemoryBroker
from tests import test_aggregator_support as _support
from tests.test_aggregator_service import DIM, Device, _service
from tests.test_aggregator_support import Fleet, deltas, make_update

keypair = _support.keypair  # session fixture

# Tests about what one batch holds switch the time bound off: on a loaded
# machine three updates can take longer than the default 5 ms.
_NO_TIME_BOUND = 3600.0


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(6, tmp_path / "registry.json")


def _send_all(svc: AggregatorService, devices: list[Device], pk: Any) -> list[Any]:
    ann = svc.machine.announcement
    assert ann is not None
    values = []
    for i, dev in enumerate(devices):
        upd, vals = make_update(ann, pk, dev.ident, deltas(len(devices), DIM)[i])
        values.append(vals)
        dev.send(upd)
    return values


class _RecordingStore:
    """Wraps the store's batch commit: records what devices held at each commit."""

    def __init__(self, svc: AggregatorService, devices: list[Device], fail: bool = False) -> None:
        self.inner = svc.store.persist_accepted_batch
        self.devices = devices
        self.fail = fail
        self.batches: list[list[str]] = []
        self.receipts_at_commit: list[dict[str, int]] = []
        svc.store.persist_accepted_batch = self  # type: ignore[method-assign]

    def __call__(self, actions: list[PersistAccepted]) -> None:
        self.receipts_at_commit.append({d.ident.device_id: len(d.receipts) for d in self.devices})
        if self.fail:
            raise StoreError("disk full (simulated)")
        self.inner(actions)
        self.batches.append([a.device_id for a in actions])


def test_queued_updates_commit_as_one_batch_and_receipts_follow_it(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.commit_batch, svc.commit_max_s = 64, _NO_TIME_BOUND
    svc.start()
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:4]]
    spy = _RecordingStore(svc, devices)
    _send_all(svc, devices, pk)

    svc.pump()

    assert spy.batches == [[d.ident.device_id for d in devices]]
    assert spy.receipts_at_commit == [{d.ident.device_id: 0 for d in devices}]
    assert [[r.status for r in d.receipts] for d in devices] == [["accepted"]] * 4
    assert len(svc.store.accepted(1)) == 4
    assert svc.store.sum_blob(1) == (svc.machine.encrypted_sum, 4)
    assert broker.pending("aggregator") == 0  # every message acknowledged after the commit
    svc.close()


def test_batch_is_bounded_by_commit_batch(keypair: Any, fleet: Fleet, tmp_path: Path) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.commit_batch, svc.commit_max_s = 2, _NO_TIME_BOUND
    svc.start()
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:5]]
    spy = _RecordingStore(svc, devices)
    _send_all(svc, devices, pk)

    svc.pump()

    assert [len(b) for b in spy.batches] == [2, 2, 1]
    # the second batch committed after the first batch's receipts went out, not its own
    first, second = spy.batches[0], spy.batches[1]
    assert all(spy.receipts_at_commit[1][d] == 1 for d in first)
    assert all(spy.receipts_at_commit[1][d] == 0 for d in second)
    svc.close()


def test_commit_batch_1_is_one_transaction_per_update(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.commit_batch = 1
    svc.start()
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:3]]
    calls: list[str] = []
    inner = svc.store.persist_accepted

    def one(action: PersistAccepted) -> None:
        calls.append(action.device_id)
        inner(action)

    svc.store.persist_accepted = one  # type: ignore[method-assign]
    _send_all(svc, devices, pk)
    svc.pump()

    assert calls == [d.ident.device_id for d in devices]
    assert svc.accept_commits == 3 and svc.updates_committed == 3
    assert [[r.status for r in d.receipts] for d in devices] == [["accepted"]] * 3
    svc.close()


def test_failed_batch_commit_sends_nothing_and_the_broker_redelivers_it(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.start()
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:3]]
    _RecordingStore(svc, devices, fail=True)
    _send_all(svc, devices, pk)

    with pytest.raises(StoreError):
        svc.pump()

    assert all(d.receipts == [] for d in devices)
    assert broker.pending("aggregator") == 3
    # the process exits (Rule 3); a new one resumes from the store
    broker.kick("aggregator")
    svc.store.close()
    svc2 = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc2.start()
    svc2.pump()
    assert sorted(d for d, _, _ in svc2.store.accepted(1)) == [d.ident.device_id for d in devices]
    assert [[r.status for r in d.receipts] for d in devices] == [["accepted"]] * 3
    assert svc2.machine.count == 3
    svc2.close()


def test_round_close_flushes_the_batch_first_and_the_sum_is_exact(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=4, min_clients=2)
    svc.commit_max_s = _NO_TIME_BOUND
    svc.start()
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:4]]
    values = _send_all(svc, devices, pk)

    svc.pump()

    rec = svc.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 4
    from aggregator.rounds import round_outcome

    _, released = round_outcome(rec.result)
    np.testing.assert_array_equal(released, np.sum(values, axis=0))
    assert svc.accept_commits == 1 and svc.updates_committed == 4
    svc.close()


def test_store_batch_is_all_or_nothing(keypair: Any, fleet: Fleet, tmp_path: Path) -> None:
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.start()
    store: AggregatorStore = svc.store
    good = PersistAccepted(
        round_id=1,
        device_id="dev00",
        update_digest=b"1" * 32,
        proof=b"p",
        sum_blob=b"s",
        count=1,
        at_ms=1,
    )
    gap = PersistAccepted(
        round_id=1,
        device_id="dev01",
        update_digest=b"2" * 32,
        proof=b"p",
        sum_blob=b"t",
        count=3,
        at_ms=1,
    )
    with pytest.raises(StoreError, match="not consecutive"):
        store.persist_accepted_batch([good, gap])
    assert store.accepted(1) == [] and store.sum_blob(1) == (b"", 0)
    svc.close()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"commit_batch": 0}, "commit_batch"),
        ({"commit_batch": 2.5}, "commit_batch"),
        ({"commit_max_ms": -1}, "commit_max_ms"),
        ({"commit_max_ms": "5"}, "commit_max_ms"),
    ],
)
def test_bad_commit_settings_are_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        commit_settings(table)


def test_commit_settings_default_to_group_commit() -> None:
    assert commit_settings({}) == (64, 5.0)
    assert commit_settings({"commit_batch": 1}) == (1, 5.0)


def test_batch_is_bounded_by_commit_max_ms(keypair: Any, fleet: Fleet, tmp_path: Path) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.commit_batch, svc.commit_max_s = 64, 0.0  # every update has waited long enough
    svc.start()
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:3]]
    spy = _RecordingStore(svc, devices)
    _send_all(svc, devices, pk)

    svc.pump()

    assert [len(b) for b in spy.batches] == [1, 1, 1]
    assert [[r.status for r in d.receipts] for d in devices] == [["accepted"]] * 3
    svc.close()


def test_duplicate_of_an_update_in_the_open_batch_waits_for_the_batch(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=6, min_clients=2)
    svc.commit_max_s = _NO_TIME_BOUND
    svc.start()
    dev = Device(broker, fleet.identities["dev00"])
    spy = _RecordingStore(svc, [dev])
    ann = svc.machine.announcement
    assert ann is not None
    upd, _ = make_update(ann, pk, dev.ident, deltas(1, DIM)[0])
    dev.send(upd)
    dev.send(upd)  # the device resends before its receipt came

    svc.pump()

    assert spy.batches == [["dev00"]]
    assert spy.receipts_at_commit == [{"dev00": 0}]  # not even the duplicate's receipt
    assert [r.status for r in dev.receipts] == ["accepted", "duplicate"]
    svc.close()
