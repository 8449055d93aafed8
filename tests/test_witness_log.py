"""A member's witness log: records survive a reopen, torn tails are cut, batches ack late."""

from __future__ import annotations

import os
from pathlib import Path

from aggregator.keyholder_service import KeyholderService
from aggregator.witness_log import WitnessLog, read_witness_log
from edge_sdk.transport import MemoryBroker
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import Fleet, deltas, make_keyholders, make_update
from tests.test_keyholder_witness import DIM, _publish_updates, _setup

keypair = _support.keypair


def _three(tmp_path: Path) -> WitnessLog:
    log = WitnessLog(tmp_path / "w" / "state-witness.log")
    for i in range(3):
        log.append(f"dev-{i}", 7, bytes([i]) * (100 + i))
    log.sync()
    return log


def test_records_survive_a_reopen_in_order(tmp_path: Path) -> None:
    log = _three(tmp_path)
    log.close()
    again = WitnessLog(tmp_path / "w" / "state-witness.log")
    assert [(d, r, len(p)) for d, r, p in again.records()] == [
        ("dev-0", 7, 100),
        ("dev-1", 7, 101),
        ("dev-2", 7, 102),
    ]
    assert again.count == 3
    assert oct((tmp_path / "w" / "state-witness.log").stat().st_mode & 0o777) == "0o600"


def test_a_torn_last_record_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "w" / "state-witness.log"
    _three(tmp_path).close()
    whole = path.stat().st_size
    os.truncate(path, whole - 5)  # a crash in the middle of the last append
    log = WitnessLog(path)
    assert [d for d, _, _ in log.records()] == ["dev-0", "dev-1"]
    log.append("dev-9", 8, b"x" * 50)
    log.sync()
    log.close()
    assert [(d, r) for d, r, _ in read_witness_log(path)] == [
        ("dev-0", 7),
        ("dev-1", 7),
        ("dev-9", 8),
    ]


def test_a_corrupt_record_ends_what_is_trusted(tmp_path: Path) -> None:
    path = tmp_path / "w" / "state-witness.log"
    _three(tmp_path).close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last payload's byte: its CRC no longer matches
    path.write_bytes(bytes(data))
    assert [d for d, _, _ in WitnessLog(path).records()] == ["dev-0", "dev-1"]
    assert len(read_witness_log(path)) == 2  # and the file was cut there


def test_rewrite_keeps_what_is_wanted_once(tmp_path: Path) -> None:
    log = _three(tmp_path)
    log.append("dev-1", 7, b"again")  # a second record of a pair: the first wins
    log.append("dev-5", 9, b"z" * 10)
    assert log.rewrite(lambda d, r: d in ("dev-1", "dev-5")) == 2
    log.append("dev-6", 9, b"y")  # appending after a rewrite goes to the new file
    log.close()
    kept = read_witness_log(tmp_path / "w" / "state-witness.log")
    assert [(d, r, len(p)) for d, r, p in kept] == [
        ("dev-1", 7, 101),
        ("dev-5", 9, 10),
        ("dev-6", 9, 1),
    ]
    assert not (tmp_path / "w" / "state-witness.log.tmp").exists()


def test_stored_updates_are_acknowledged_only_after_their_batch_is_synced(  # type: ignore[no-untyped-def]
    keypair, tmp_path: Path
) -> None:
    pk, _ = keypair
    fleet, _, _, _, _, _, ann = _setup(keypair, tmp_path)
    broker = MemoryBroker()
    state = tmp_path / "kh" / "state.json"
    state.parent.mkdir()
    member = make_keyholders(_support._default_committee(), fleet)[0]
    service = KeyholderService(
        member,
        broker.transport("keyholder-1", manual_ack=True),
        state_path=state,
        witness_batch=2,
        witness_sync_ms=60_000,  # the flusher never fires in this test
    )
    service.start()
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    log_path = tmp_path / "kh" / "state-witness.log"
    _publish_updates(broker, updates[:1])
    assert broker.pending("keyholder-1") == 1  # stored, not durable: not acknowledged
    assert service.witness_syncs == 0
    _publish_updates(broker, updates[1:])
    # the second update filled the batch of 2: one fsync, two acks; the third waits
    assert service.witness_syncs == 1
    assert broker.pending("keyholder-1") == 1
    assert [d for d, _, _ in read_witness_log(log_path)] == [u.device_id for u in updates[:2]]
    service.close()  # a clean stop syncs and acknowledges the rest
    assert broker.pending("keyholder-1") == 0
    assert [d for d, _, _ in read_witness_log(log_path)] == [u.device_id for u in updates]


def test_a_member_killed_before_its_sync_gets_the_updates_redelivered(  # type: ignore[no-untyped-def]
    keypair, tmp_path: Path
) -> None:
    pk, _ = keypair
    fleet = Fleet.create(4, tmp_path / "registry.json")
    _, _, _, _, _, _, ann = _setup(keypair, tmp_path / "setup")
    broker = MemoryBroker()
    state = tmp_path / "kh" / "state.json"
    state.parent.mkdir()
    committee = _support._default_committee()
    durable = {"manual_ack": True, "clean_start": False, "session_expiry_s": 3600}
    first = KeyholderService(
        make_keyholders(committee, fleet)[0],
        broker.transport("keyholder-1", **durable),
        state_path=state,
        witness_sync_ms=60_000,
    )
    first.start()
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    _publish_updates(broker, updates)
    assert broker.pending("keyholder-1") == 3
    # power loss: what was never fsynced never reached the disk
    assert first.witness_log is not None
    first.witness_log._file = open(os.devnull, "ab")  # noqa: SIM115 - the dead process's file
    first.transport.close()
    os.truncate(tmp_path / "kh" / "state-witness.log", 0)
    restarted = make_keyholders(committee, fleet)[0]
    second = KeyholderService(
        restarted,
        broker.transport("keyholder-1", **durable),
        state_path=state,
        witness_sync_ms=1,
    )
    assert second.reloaded == 0
    second.start()  # the durable session redelivers the three unacknowledged updates
    second.flush_witness()
    assert all(restarted.witnessed(u.device_id, 1) is not None for u in updates)
    assert broker.pending("keyholder-1") == 0
    second.close()
