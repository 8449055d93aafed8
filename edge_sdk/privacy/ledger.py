"""The device's durable privacy ledger: what it has spent, recorded before it sends.

Rules this module keeps (each one is tested with real SIGKILLs):

1. A spend is on disk (file and directory fsynced) BEFORE the update may leave
   the device: the agent calls :meth:`PrivacyLedger.record` and sends only
   after it returns.
2. Validate, then mutate: a round that would exceed the budget is refused
   with :class:`~edge_sdk.errors.BudgetExhaustedError` and nothing changes,
   in memory or on disk.
3. Writes are atomic (temporary file, fsync, rename, fsync of the directory):
   a kill at any instant leaves either the old or the new ledger.
4. A ledger that cannot be read or fails its checksum raises
   :class:`~edge_sdk.errors.LedgerCorruptedError`. It is never reset to zero:
   an attacker (or a bad SD card) must not be able to refill the budget by
   breaking a file.
5. Idempotency: each round is recorded once with the digest of the noised
   update that was prepared for it. Re-recording the same digest (the agent
   resending its stored envelope after a reboot) costs nothing; a DIFFERENT
   update for an already-spent round is refused with
   :class:`RoundAlreadySpentError`, so the agent resends the stored update
   instead of drawing fresh noise. :meth:`PrivacyLedger.has_spent` answers
   "is round r already spent?".

Known limit: a deleted ledger file cannot be told from a new device. Keep the
ledger on storage the device's owner cannot silently wipe, or bind it to the
device identity on the server side.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk._fs import atomic_write, remove_stale_temporaries
from edge_sdk.errors import (
    BudgetExhaustedError,
    ConfigError,
    DecodeError,
    LedgerCorruptedError,
    PrivacyError,
)
from edge_sdk.privacy.accounting import PrivacyCost, Which, compose_epsilon

__all__ = ["LedgerEntry", "PrivacyLedger", "RoundAlreadySpentError", "update_digest"]

_KIND = "edgefl.privacy_ledger"
_VERSION = 1
_TOP_KEYS = {"kind", "version", "budget_epsilon", "delta", "entries", "sha256"}
_ENTRY_KEYS = {
    "seq",
    "round_key",
    "idempotency_key",
    "federation",
    "round_id",
    "cost",
    "noise",
    "epsilon_after",
    "recorded_unix",
}
_MAX_KEY = 512


class RoundAlreadySpentError(PrivacyError):
    """A different update was prepared for a round that is already spent."""

    reason = "round_already_spent"


def update_digest(payload: bytes) -> str:
    """The idempotency key of a prepared update: SHA-256 of its bytes, hex."""
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One recorded participation.

    Attributes:
        seq: position in the ledger (0, 1, ...).
        round_key: unique key of the round, e.g. ``"{federation}/{round}"``.
        idempotency_key: digest of the noised update prepared for the round.
        federation: federation name, if given.
        round_id: round number or id, if given.
        cost: the privacy cost charged.
        noise: the applied noise spec (wire dict), if given.
        epsilon_after: central epsilon spent including this entry.
        recorded_unix: wall-clock time of the record (injected clock).
    """

    seq: int
    round_key: str
    idempotency_key: str
    federation: str | None
    round_id: int | str | None
    cost: PrivacyCost
    noise: dict[str, Any] | None
    epsilon_after: float
    recorded_unix: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for the file."""
        return {
            "seq": self.seq,
            "round_key": self.round_key,
            "idempotency_key": self.idempotency_key,
            "federation": self.federation,
            "round_id": self.round_id,
            "cost": self.cost.to_dict(),
            "noise": self.noise,
            "epsilon_after": self.epsilon_after,
            "recorded_unix": self.recorded_unix,
        }

    @classmethod
    def from_dict(cls, data: object) -> LedgerEntry:
        """Decode and validate one entry (ValueError on anything malformed)."""
        if not isinstance(data, dict) or set(data) != _ENTRY_KEYS:
            raise ValueError(f"malformed ledger entry {data!r}")
        seq, rk, ik = data["seq"], data["round_key"], data["idempotency_key"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"bad seq {seq!r}")
        for name, value in (("round_key", rk), ("idempotency_key", ik)):
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_KEY:
                raise ValueError(f"bad {name} {value!r}")
        fed, rid = data["federation"], data["round_id"]
        if fed is not None and not isinstance(fed, str):
            raise ValueError(f"bad federation {fed!r}")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
            raise ValueError(f"bad round_id {rid!r}")
        noise = data["noise"]
        if noise is not None and not isinstance(noise, dict):
            raise ValueError("bad noise record")
        eps, when = data["epsilon_after"], data["recorded_unix"]
        for name, value in (("epsilon_after", eps), ("recorded_unix", when)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"bad {name} {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"bad {name} {value!r}")
        try:
            cost = PrivacyCost.from_dict(data["cost"])
        except DecodeError as exc:
            raise ValueError(str(exc)) from exc
        return cls(
            seq=seq,
            round_key=rk,
            idempotency_key=ik,
            federation=fed,
            round_id=rid,
            cost=cost,
            noise=noise,
            epsilon_after=float(eps),
            recorded_unix=float(when),
        )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _check_budget_args(budget_epsilon: float, delta: float) -> None:
    if isinstance(budget_epsilon, bool) or not isinstance(budget_epsilon, (int, float)):
        raise ValueError(f"budget_epsilon must be a number, got {budget_epsilon!r}")
    if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
        raise ValueError(f"budget_epsilon must be finite and > 0, got {budget_epsilon}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


class PrivacyLedger:
    """A device's durable record of privacy spent, with a hard budget.

    Args:
        path: the ledger file (created, durably, if missing).
        budget_epsilon: total central epsilon the device may spend.
        delta: the delta all epsilons refer to.
        clock: wall-clock source for entry timestamps (injected for tests).
        step_hook: TEST SEAM: called with a step name ("tmp_written",
            "tmp_synced", "renamed", "dir_synced") during each write, so
            tests can kill the process between steps.

    Raises:
        LedgerCorruptedError: the existing file is unreadable or tampered with.
        ConfigError: the existing file was created with another budget or delta.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        budget_epsilon: float,
        delta: float,
        *,
        clock: Callable[[], float] = time.time,
        step_hook: Callable[[str], None] | None = None,
    ) -> None:
        _check_budget_args(budget_epsilon, delta)
        self._path = Path(path)
        self._budget = float(budget_epsilon)
        self._delta = float(delta)
        self._clock = clock
        self._hook = step_hook
        self._entries: tuple[LedgerEntry, ...] = ()
        with self._locked():
            remove_stale_temporaries(self._path)  # left by a write killed mid-way
            if self._path.exists():
                budget, dlt, entries = self._read()
                if budget != self._budget or dlt != self._delta:
                    raise ConfigError(
                        f"ledger {self._path} was created with budget epsilon {budget} and "
                        f"delta {dlt}, not {self._budget} and {self._delta}; a ledger's budget "
                        "is fixed for its lifetime"
                    )
                self._entries = entries
            else:
                self._write(())

    @classmethod
    def open_existing(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Open an existing ledger with the budget stored in it (for reports).

        Raises:
            ConfigError: no such file.
            LedgerCorruptedError: unreadable or tampered with.
        """
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"no privacy ledger at {p}")
        budget, dlt, _ = cls._read_file(p)
        return cls(p, budget, dlt)

    # ------------------------------------------------------------------ queries

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def budget_epsilon(self) -> float:
        """The total central epsilon this device may spend."""
        return self._budget

    @property
    def delta(self) -> float:
        """The delta of every epsilon figure."""
        return self._delta

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All recorded participations, oldest first."""
        return self._entries

    def has_spent(self, round_key: str) -> bool:
        """Whether round ``round_key`` is already charged (then resend, never re-noise)."""
        return self.entry(round_key) is not None

    def entry(self, round_key: str) -> LedgerEntry | None:
        """The entry for ``round_key``, or None."""
        for e in self._entries:
            if e.round_key == round_key:
                return e
        return None

    def spent(self, which: Which = "central") -> float:
        """Epsilon spent so far (``"central"``: released aggregates; ``"local"``: updates)."""
        return self._epsilon(self._entries, None, which)

    def remaining(self) -> float:
        """Central epsilon still available (never negative)."""
        return max(0.0, self._budget - self.spent())

    def epsilon_if(self, cost: PrivacyCost, *, delta: float | None = None) -> float:
        """Central epsilon spent if one more participation at ``cost`` were recorded.

        Args:
            cost: the participation.
            delta: the delta to state it at (default: the ledger's own).
        """
        return self._epsilon(self._entries, cost, "central", delta)

    def check(self, cost: PrivacyCost) -> float:
        """Validate one more participation at ``cost`` without recording it.

        Returns:
            The central epsilon after it.

        Raises:
            BudgetExhaustedError: it would exceed the budget.
        """
        after = self.epsilon_if(cost)
        if after > self._budget:
            raise BudgetExhaustedError(
                f"taking part would raise epsilon to {after:.6g} > budget {self._budget:.6g} "
                f"(spent {self.spent():.6g} in {len(self._entries)} rounds)"
            )
        return after

    # ------------------------------------------------------------------ mutation

    def record(
        self,
        round_key: str,
        cost: PrivacyCost,
        *,
        idempotency_key: str,
        federation: str | None = None,
        round_id: int | str | None = None,
        noise: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Durably charge one participation; returns after file and directory are synced.

        Re-recording the same ``round_key`` with the same ``idempotency_key``
        returns the existing entry and charges nothing.

        Args:
            round_key: unique key of the round (``"{federation}/{round}"``).
            cost: the participation's cost (:func:`~edge_sdk.privacy.cost_of`).
            idempotency_key: digest of the prepared noised update
                (:func:`update_digest`).
            federation: optional federation name, for the record.
            round_id: optional round number, for the record.
            noise: optional wire dict of the applied noise spec.

        Returns:
            The (new or existing) entry.

        Raises:
            RoundAlreadySpentError: the round is spent with a different update.
            BudgetExhaustedError: the budget would be exceeded (nothing changes).
            LedgerCorruptedError: the file on disk is broken.
        """
        for name, value in (("round_key", round_key), ("idempotency_key", idempotency_key)):
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_KEY:
                raise ValueError(f"{name} must be a non-empty string of <= {_MAX_KEY} chars")
        with self._locked():
            # Another process may have written since we loaded: re-read first.
            _, _, entries = self._read()
            self._entries = entries
            existing = self.entry(round_key)
            if existing is not None:
                if existing.idempotency_key == idempotency_key:
                    return existing
                raise RoundAlreadySpentError(
                    f"round {round_key!r} is already spent with update "
                    f"{existing.idempotency_key[:16]}...; resend that update, do not re-noise"
                )
            after = self.check(cost)
            entry = LedgerEntry(
                seq=len(entries),
                round_key=round_key,
                idempotency_key=idempotency_key,
                federation=federation,
                round_id=round_id,
                cost=cost,
                noise=noise,
                epsilon_after=after,
                recorded_unix=float(self._clock()),
            )
            new_entries = (*entries, entry)
            self._write(new_entries)
            self._entries = new_entries
            return entry

    # ------------------------------------------------------------------ internals

    def _epsilon(
        self,
        entries: tuple[LedgerEntry, ...],
        extra: PrivacyCost | None,
        which: Which,
        delta: float | None = None,
    ) -> float:
        # Group identical costs so that k equal rounds compose as k * curve,
        # exactly the figure the calibration checked.
        groups: dict[bytes, tuple[PrivacyCost, int]] = {}
        for cost in [*(e.cost for e in entries), *([extra] if extra else [])]:
            key = _canonical(cost.to_dict())
            prev = groups.get(key)
            groups[key] = (cost, 1 if prev is None else prev[1] + 1)
        return compose_epsilon(groups.values(), self._delta if delta is None else delta, which)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self._path.with_name(self._path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> tuple[float, float, tuple[LedgerEntry, ...]]:
        if not self._path.exists():
            raise LedgerCorruptedError(f"privacy ledger {self._path} disappeared")
        return self._read_file(self._path)

    @staticmethod
    def _read_file(path: Path) -> tuple[float, float, tuple[LedgerEntry, ...]]:
        try:
            raw = path.read_bytes()
            doc = json.loads(raw.decode("utf-8"))
            if not isinstance(doc, dict) or set(doc) != _TOP_KEYS:
                raise ValueError("wrong top-level fields")
            if doc["kind"] != _KIND or doc["version"] != _VERSION:
                raise ValueError(f"unknown kind/version {doc['kind']!r}/{doc['version']!r}")
            body = {k: v for k, v in doc.items() if k != "sha256"}
            if hashlib.sha256(_canonical(body)).hexdigest() != doc["sha256"]:
                raise ValueError("checksum mismatch")
            _check_budget_args(doc["budget_epsilon"], doc["delta"])
            if not isinstance(doc["entries"], list):
                raise ValueError("entries is not a list")
            entries = tuple(LedgerEntry.from_dict(e) for e in doc["entries"])
            keys = [e.round_key for e in entries]
            if len(set(keys)) != len(keys):
                raise ValueError("duplicate round keys")
            if [e.seq for e in entries] != list(range(len(entries))):
                raise ValueError("entries out of sequence")
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise LedgerCorruptedError(
                f"privacy ledger {path} is corrupted ({exc}); refusing to reset it. "
                "Restore it from a backup or retire this device identity."
            ) from exc
        return float(doc["budget_epsilon"]), float(doc["delta"]), entries

    def _step(self, name: str) -> None:
        if self._hook is not None:
            self._hook(name)

    def _write(self, entries: tuple[LedgerEntry, ...]) -> None:
        body: dict[str, Any] = {
            "kind": _KIND,
            "version": _VERSION,
            "budget_epsilon": self._budget,
            "delta": self._delta,
            "entries": [e.to_dict() for e in entries],
        }
        doc = dict(body, sha256=hashlib.sha256(_canonical(body)).hexdigest())
        data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"
        atomic_write(self._path, data, step=self._step)
