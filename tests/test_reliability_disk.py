"""On-disk crash consistency (issue 9, case 16).

A child process is SIGKILLed at a chosen point of a durable write; the parent
then starts the component the way a rebooted device or a restarted service
would and checks that start-up cleans up, the integrity check passes, and the
state is either the old one complete or the new one complete.

* the device outbox (``edge_sdk._fs.atomic_write``): between the temporary
  write and the rename, and between the rename and the directory fsync;
* the aggregator store (SQLite WAL): inside an open transaction (a stale
  ``-wal`` holding uncommitted frames) and right after a commit that was not
  checkpointed (the ``-wal`` holds the only copy of the new state).

The privacy ledger's equivalent (every step of spend-and-send, and again
during recovery) is ``test_privacy_ledger.py::test_sigkill_*``; the
obfuscator pool's is ``test_crypto_pool.py::test_sigkill_*``.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from aggregator.store import AggregatorStore
from edge_sdk.agent.outbox import Outbox
from edge_sdk.protocol import RoundAnnouncement
from tests import test_aggregator_support as _support
from tests.reliability_helpers import REPO
from tests.test_aggregator_support import FED, Fleet, deltas, make_machine, make_update

keypair = _support.keypair  # session fixture

OUTBOX_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import edge_sdk._fs as fs
    from edge_sdk.agent.outbox import Outbox
    from edge_sdk.protocol import EncryptedUpdate

    folder, new_file, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "before_rename":
        fs.os.replace = die          # the temporary is written and fsynced
    elif point == "before_dir_fsync":
        fs.fsync_dir = die           # renamed, directory entry not yet flushed
    Outbox(folder).store(EncryptedUpdate.from_bytes(new_file.read_bytes()))
    print("no crash")
    """
)


def _run_child(code: str, *args: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=str(REPO),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()
    return proc.returncode


@pytest.mark.parametrize("point", ["before_rename", "before_dir_fsync"])
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "replacing"])
def test_outbox_crash_inside_atomic_write_leaves_old_or_new_and_is_cleaned(
    keypair: Any, tmp_path: Path, point: str, previous: bool
) -> None:
    pk, _ = keypair
    fleet = Fleet.create(1, tmp_path / "registry.json")
    machine = make_machine(pk, fleet, dim=20)
    from aggregator.rounds import Start

    machine.handle(Start(now_ms=1))
    ann: RoundAnnouncement | None = machine.announcement
    assert ann is not None
    ident = fleet.identities["dev00"]
    old, _ = make_update(ann, pk, ident, deltas(1, 20)[0], seed=1)
    new, _ = make_update(ann, pk, ident, deltas(1, 20, seed=9)[0], seed=2)
    folder = tmp_path / "outbox"
    if previous:
        Outbox(folder).store(old)
    (tmp_path / "new.bin").write_bytes(new.to_bytes())
    code = _run_child(OUTBOX_CHILD, str(folder), str(tmp_path / "new.bin"), point)
    assert code == -signal.SIGKILL
    stale = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    assert len(stale) == (1 if point == "before_rename" else 0)
    # the device reboots
    outbox = Outbox(folder)
    assert outbox.removed_temporaries == len(stale)
    assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []
    entries = outbox.entries()
    assert outbox.quarantined == []  # never a torn file
    if point == "before_rename":
        expected = [old.to_bytes()] if previous else []
    else:
        expected = [new.to_bytes()]  # the rename happened: new-complete
    assert [e.payload for e in entries] == expected


STORE_CHILD = textwrap.dedent(
    """
    import os, signal, sqlite3, sys
    path, point = sys.argv[1], sys.argv[2]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=0")   # keep the new state in the -wal only
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE rounds SET phase = 'failed', outcome = 'crash-test' WHERE round_id = 1")
    db.execute("INSERT INTO meta VALUES ('crash_marker', 'new') "
               "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
    if point == "commit":
        db.execute("COMMIT")
    else:
        # spill the transaction's pages into the WAL before the kill: a tiny
        # page cache and enough rows make SQLite write uncommitted frames
        db.execute("PRAGMA cache_size=2")
        for i in range(3000):
            db.execute("INSERT INTO rejections VALUES (?, ?, 1)", (99, "x" * 200 + str(i)))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("point", ["open_transaction", "commit"])
def test_store_recovers_from_a_stale_wal_of_a_killed_process(
    keypair: Any, tmp_path: Path, point: str
) -> None:
    pk, _ = keypair
    fleet = Fleet.create(4, tmp_path / "registry.json")
    path = tmp_path / "agg.db"
    # a real store with a round and accepted updates (the "old" state)
    from aggregator.rounds import Start
    from tests.test_aggregator_rounds import Driver

    machine = make_machine(pk, fleet, dim=20, target=4)
    store = AggregatorStore(path, federation=FED, key_fingerprint=pk.fingerprint)
    d = Driver(machine, store, _support.make_keyholders(_support._default_committee(), fleet))
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    for i, dev in enumerate(fleet.ids()[:2]):
        d.send(make_update(ann, pk, fleet.identities[dev], deltas(4, 20)[i])[0])
    before = store.load_snapshot()
    store.close()
    assert before is not None and before.count == 2

    assert _run_child(STORE_CHILD, str(path), point) == -signal.SIGKILL
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # the killed process left its WAL

    reopened = AggregatorStore(path, federation=FED, key_fingerprint=pk.fingerprint)
    try:
        (check,) = reopened._db.execute("PRAGMA integrity_check").fetchone()
        assert check == "ok"
        rec = reopened.round_record(1)
        assert rec is not None
        marker = reopened.meta().get("crash_marker")
        if point == "commit":  # new-complete: both writes of the transaction
            assert (rec.phase, rec.outcome, marker) == ("failed", "crash-test", "new")
        else:  # old-complete: neither
            assert (rec.phase, rec.outcome, marker) == ("collecting", "", None)
            assert reopened.rejection_counts(99) == {}  # the spilled frames were discarded
            after = reopened.load_snapshot()
            assert after is not None
            assert (after.count, after.sum_blob, after.accepted) == (
                before.count,
                before.sum_blob,
                before.accepted,
            )
        # and it stays writable: a new round transition commits
        reopened.flush_rejections()
        reopened.count_rejection(1, "probe")
        reopened.flush_rejections()
        assert reopened.rejection_counts(1) == {"probe": 1}
    finally:
        reopened.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
