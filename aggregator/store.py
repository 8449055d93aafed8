"""Crash-safe aggregator store: SQLite in WAL mode with ``synchronous=FULL``.

What is kept (schema version 1):

* ``rounds``: one row per round: phase, announcement, the running encrypted
  sum and its count, the key holder request and result, the outcome;
* ``accepted``: one row per accepted update: round, device, update digest,
  and the signed :class:`~edge_sdk.protocol.ContributorProof` (header and
  signature; the ciphertext blob itself is NOT stored: the running sum
  already contains it, and keeping every blob would multiply the write
  volume by the cohort size. A verify-mode key holder therefore needs the
  blobs from elsewhere; see ``aggregator.keyholder``);
* ``models``: every global model version (the hash chain) with the
  optimizer state that produced it;
* ``meta``: the current round, store format, federation and key fingerprint;
* ``rejections``: counters of refused messages by round and reason (for
  ``edgefl status``; advisory, written in batches).

Atomicity: an accepted row and the new running sum are written in ONE
transaction (:meth:`AggregatorStore.persist_accepted`), or a batch of
consecutive accepted rows and the newest sum in one (group commit,
:meth:`AggregatorStore.persist_accepted_batch`); a round transition
(close, result, failure, next round, new model) is one transaction
(:meth:`AggregatorStore.commit`). With ``synchronous=FULL`` a transaction
that returned is on disk; a kill -9 at any point leaves either the state
before or after it. Plaintexts never reach this file: the key holder result
holds only the released aggregate (the same information as the next model).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aggregator.rounds import Commit, PersistAccepted, RoundRecord, Snapshot
from edge_sdk.errors import ConfigError, EdgeFLError
from edge_sdk.protocol import GlobalModel

__all__ = ["STORE_FORMAT", "AggregatorStore", "StoreError"]

STORE_FORMAT = "edgefl-aggregator-store/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY,
    phase TEXT NOT NULL,
    announcement BLOB NOT NULL,
    opened_ms INTEGER NOT NULL,
    closed_ms INTEGER NOT NULL DEFAULT 0,
    count INTEGER NOT NULL DEFAULT 0,
    sum_blob BLOB NOT NULL DEFAULT x'',
    request BLOB NOT NULL DEFAULT x'',
    result BLOB NOT NULL DEFAULT x'',
    outcome TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS accepted (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    update_digest BLOB NOT NULL,
    proof BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL,
    digest BLOB NOT NULL,
    parent_digest BLOB NOT NULL,
    payload BLOB NOT NULL,
    optimizer_state BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    round_id INTEGER NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (round_id, reason)
);
"""


class StoreError(EdgeFLError):
    """The store is inconsistent or belongs to another federation/key."""

    reason = "store"


class AggregatorStore:
    """The aggregator's durable state.

    Args:
        path: the SQLite file (created with its directory).
        federation: checked against (or recorded in) the file.
        key_fingerprint: the Paillier key fingerprint, checked likewise.
        readonly: open for ``edgefl status`` (no writes, no creation).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        federation: str | None = None,
        key_fingerprint: str | None = None,
        readonly: bool = False,
    ) -> None:
        """Open (and create, unless read-only) the store."""
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise ConfigError(f"store {self.path} does not exist")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._check_meta(federation, key_fingerprint)
        self._pending_rejections: dict[tuple[int, str], int] = {}

    def _check_meta(self, federation: str | None, fingerprint: str | None) -> None:
        meta = self.meta()
        with self._tx():
            if "format" not in meta:
                self._db.execute("INSERT INTO meta VALUES ('format', ?)", (STORE_FORMAT,))
            elif meta["format"] != STORE_FORMAT:
                raise StoreError(f"{self.path}: unknown store format {meta['format']!r}")
            for key, value in (("federation", federation), ("key_fingerprint", fingerprint)):
                if value is None:
                    continue
                if key not in meta:
                    self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
                elif meta[key] != value:
                    raise StoreError(
                        f"{self.path} belongs to {key} {meta[key]!r}, not {value!r}; "
                        "use a new store for a new federation or key"
                    )

    def close(self) -> None:
        """Flush advisory counters and close the file."""
        try:
            self.flush_rejections()
        finally:
            self._db.close()

    def __enter__(self) -> AggregatorStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transactions --------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")

    def _tx(self) -> AggregatorStore._Tx:
        return AggregatorStore._Tx(self._db)

    def meta(self) -> dict[str, str]:
        """The meta table."""
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def persist_accepted(self, action: PersistAccepted) -> None:
        """Insert the accepted row and store the new running sum, atomically.

        Raises:
            StoreError: the round is not collecting, or the device already has
                an accepted row (the machine never asks for that).
        """
        self.persist_accepted_batch((action,))

    def persist_accepted_batch(self, actions: Sequence[PersistAccepted]) -> None:
        """Insert several accepted rows and the newest running sum in ONE transaction.

        Group commit: one fsync for the whole batch. The actions must be
        consecutive acceptances of one round, in the order the machine
        returned them (counts ``k+1, k+2, ...`` on a stored count ``k``);
        the running sum stored is the last action's, which contains every
        update of the batch. All or nothing: a kill -9 leaves the store
        before or after the whole batch.

        Raises:
            StoreError: the round is not collecting, the counts are not
                consecutive, or a device already has an accepted row.
        """
        if not actions:
            return
        first = actions[0]
        with self._tx():
            row = self._db.execute(
                "SELECT phase, count FROM rounds WHERE round_id = ?", (first.round_id,)
            ).fetchone()
            if row is None or row[0] != "collecting" or row[1] + 1 != first.count:
                raise StoreError(
                    f"cannot accept into round {first.round_id}: stored {row!r}, "
                    f"new count {first.count}"
                )
            self._insert_accepted(actions)

    def _insert_accepted(self, actions: Sequence[PersistAccepted]) -> None:
        """Inside a transaction: the rows, then the last action's sum and count."""
        first, last = actions[0], actions[-1]
        for i, action in enumerate(actions):
            if action.round_id != first.round_id or action.count != first.count + i:
                raise StoreError(
                    f"batch is not consecutive: round {action.round_id} count "
                    f"{action.count} after round {first.round_id} count {first.count + i - 1}"
                )
            try:
                self._db.execute(
                    "INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        action.round_id,
                        action.device_id,
                        action.update_digest,
                        action.proof,
                        action.at_ms,
                        action.count,
                    ),
                )
            except sqlite3.IntegrityError:
                raise StoreError(
                    f"device {action.device_id} already accepted in round {action.round_id}"
                ) from None
        self._db.execute(
            "UPDATE rounds SET sum_blob = ?, count = ? WHERE round_id = ?",
            (last.sum_blob, last.count, last.round_id),
        )

    def commit(self, action: Commit) -> None:
        """Apply a round transition (and a new model) atomically."""
        with self._tx():
            for rec in action.records:
                self._db.execute(
                    """INSERT INTO rounds (round_id, phase, announcement, opened_ms, closed_ms,
                           count, request, result, outcome)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(round_id) DO UPDATE SET phase = excluded.phase,
                           closed_ms = excluded.closed_ms, count = excluded.count,
                           request = excluded.request, result = excluded.result,
                           outcome = excluded.outcome""",
                    (
                        rec.round_id,
                        rec.phase,
                        rec.announcement,
                        rec.opened_ms,
                        rec.closed_ms,
                        rec.count,
                        rec.request,
                        rec.result,
                        rec.outcome,
                    ),
                )
            if action.accepted:
                self._insert_accepted(action.accepted)
            if action.model is not None:
                m = action.model
                self._db.execute(
                    "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        m.version,
                        m.round_id,
                        m.digest,
                        m.parent_digest,
                        m.to_bytes(),
                        action.optimizer_state or b"",
                        m.created_ms,
                    ),
                )
            if action.records:
                self._db.execute(
                    "INSERT INTO meta VALUES ('current_round', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(action.records[-1].round_id),),
                )

    def apply(self, action: Any) -> bool:
        """Execute a persist action; return False for other actions."""
        if isinstance(action, PersistAccepted):
            self.persist_accepted(action)
            return True
        if isinstance(action, Commit):
            self.commit(action)
            return True
        return False

    # -- advisory counters ---------------------------------------------------

    def count_rejection(self, round_id: int | None, reason: str) -> None:
        """Count a rejection (written by :meth:`flush_rejections`)."""
        key = (-1 if round_id is None else round_id, reason)
        self._pending_rejections[key] = self._pending_rejections.get(key, 0) + 1

    def flush_rejections(self) -> None:
        """Write the pending rejection counters."""
        if not self._pending_rejections:
            return
        pending, self._pending_rejections = self._pending_rejections, {}
        with self._tx():
            for (round_id, reason), n in pending.items():
                self._db.execute(
                    "INSERT INTO rejections VALUES (?, ?, ?) ON CONFLICT(round_id, reason) "
                    "DO UPDATE SET count = count + excluded.count",
                    (round_id, reason, n),
                )

    # -- reading -------------------------------------------------------------

    def current_round(self) -> int | None:
        """The current round id, or None for an empty store."""
        value = self.meta().get("current_round")
        return None if value is None else int(value)

    def round_record(self, round_id: int) -> RoundRecord | None:
        """One round's record."""
        row = self._db.execute(
            "SELECT round_id, phase, announcement, opened_ms, closed_ms, count, request, "
            "result, outcome FROM rounds WHERE round_id = ?",
            (round_id,),
        ).fetchone()
        if row is None:
            return None
        return RoundRecord(
            round_id=row[0],
            phase=row[1],
            announcement=bytes(row[2]),
            opened_ms=row[3],
            closed_ms=row[4],
            count=row[5],
            request=bytes(row[6]),
            result=bytes(row[7]),
            outcome=row[8],
        )

    def rounds(self) -> list[RoundRecord]:
        """Every round, oldest first."""
        ids = [r[0] for r in self._db.execute("SELECT round_id FROM rounds ORDER BY round_id")]
        return [rec for rec in (self.round_record(i) for i in ids) if rec is not None]

    def accepted(self, round_id: int) -> list[tuple[str, bytes, bytes]]:
        """``(device_id, update_digest, proof)`` of a round, in acceptance order."""
        return [
            (row[0], bytes(row[1]), bytes(row[2]))
            for row in self._db.execute(
                "SELECT device_id, update_digest, proof FROM accepted WHERE round_id = ? "
                "ORDER BY seq",
                (round_id,),
            )
        ]

    def sum_blob(self, round_id: int) -> tuple[bytes, int]:
        """A round's running sum and count."""
        row = self._db.execute(
            "SELECT sum_blob, count FROM rounds WHERE round_id = ?", (round_id,)
        ).fetchone()
        return (b"", 0) if row is None else (bytes(row[0]), int(row[1]))

    def latest_model(self) -> tuple[GlobalModel, bytes] | None:
        """The newest model and the optimizer state stored with it."""
        row = self._db.execute(
            "SELECT payload, optimizer_state FROM models ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return GlobalModel.from_bytes(bytes(row[0])), bytes(row[1])

    def models(self) -> list[tuple[int, int, bytes]]:
        """``(version, round_id, digest)`` of every model, oldest first."""
        return [
            (row[0], row[1], bytes(row[2]))
            for row in self._db.execute(
                "SELECT version, round_id, digest FROM models ORDER BY version"
            )
        ]

    def model(self, version: int) -> GlobalModel | None:
        """One model version."""
        row = self._db.execute(
            "SELECT payload FROM models WHERE version = ?", (version,)
        ).fetchone()
        return None if row is None else GlobalModel.from_bytes(bytes(row[0]))

    def rejection_counts(self, round_id: int | None = None) -> dict[str, int]:
        """Rejections by reason (one round, or all)."""
        if round_id is None:
            rows: Iterable[Any] = self._db.execute(
                "SELECT reason, SUM(count) FROM rejections GROUP BY reason"
            )
        else:
            rows = self._db.execute(
                "SELECT reason, count FROM rejections WHERE round_id = ?", (round_id,)
            )
        return {str(r[0]): int(r[1]) for r in rows}

    def load_snapshot(self, history_rounds: int = 4) -> Snapshot | None:
        """The state the round machine resumes from; None for an empty store.

        Raises:
            StoreError: rows are missing or contradict each other.
        """
        current = self.current_round()
        if current is None:
            return None
        record = self.round_record(current)
        latest = self.latest_model()
        if record is None or latest is None:
            raise StoreError(f"{self.path}: current round {current} or its model is missing")
        model, opt_state = latest
        sum_blob, count = self.sum_blob(current)
        rows = self.accepted(current)
        if len(rows) != count:
            raise StoreError(
                f"{self.path}: round {current} has {len(rows)} accepted rows, sum of {count}"
            )
        history: dict[int, dict[str, bytes]] = {}
        for rid in range(max(1, current - history_rounds + 1), current + 1):
            history[rid] = {d: dig for d, dig, _ in self.accepted(rid)}
        return Snapshot(
            current=record,
            sum_blob=sum_blob,
            count=count,
            accepted=tuple(p for _, _, p in rows),
            model=model,
            optimizer_state=opt_state,
            history=history,
        )

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``edgefl status``."""
        meta = self.meta()
        current = self.current_round()
        out: dict[str, Any] = {
            "store": str(self.path),
            "federation": meta.get("federation"),
            "key_fingerprint": meta.get("key_fingerprint"),
            "current_round": current,
        }
        if current is not None:
            rec = self.round_record(current)
            if rec is not None:
                from edge_sdk.protocol import RoundAnnouncement

                ann = RoundAnnouncement.from_bytes(rec.announcement)
                out["round"] = {
                    "round_id": rec.round_id,
                    "phase": rec.phase,
                    "outcome": rec.outcome,
                    "count": rec.count,
                    "min_clients": ann.min_clients,
                    "deadline_ms": ann.deadline_ms,
                    "seconds_to_deadline": round(ann.deadline_ms / 1000 - time.time(), 1),
                    "model_version": ann.model_version,
                    "contributors": [d for d, _, _ in self.accepted(current)],
                    "rejections": self.rejection_counts(current),
                }
        history = self.rounds()
        out["rounds_done"] = sum(1 for r in history if r.phase == "done")
        out["rounds_failed"] = {r.round_id: r.outcome for r in history if r.phase == "failed"}
        models = self.models()
        if models:
            version, round_id, digest = models[-1]
            out["model"] = {"version": version, "round_id": round_id, "digest": digest.hex()}
        out["rejections_total"] = self.rejection_counts()
        # federated evaluation / adaptive clipping: the noised totals of each
        # finished round's extra slots (nothing when no round carried any)
        from aggregator.rounds import round_metrics

        federated = []
        for r in history:
            metrics = round_metrics(r) if r.phase == "done" else None
            if metrics is not None:
                federated.append({"round_id": r.round_id, **metrics.to_dict()})
        if federated:
            out["federated"] = federated
        return out
