"""A committee member's durable copies of the updates it witnessed.

One append-only file, records of::

    [u32 payload length][u64 round][u16 device-id length][device id]
    [u32 CRC-32 of the payload][payload]

where the payload is the device's signed update, byte for byte as received.
Records are buffered by :meth:`WitnessLog.append` and made durable by
:meth:`WitnessLog.sync` (one ``fsync`` for a whole batch; the service
acknowledges a batch's broker messages only after it). Session 5 measured
the old layout, a file per update written atomically (two fsyncs, a
directory each), at 0.74 ms per update on this disk, most of a member's
time in a large round.

At start the whole file is read back (:meth:`WitnessLog.records`): a torn
last record (a crash mid-append) or one whose CRC does not match is cut off
there, never trusted; every update read back is verified again by the
witness, exactly as a broker-delivered one. :meth:`WitnessLog.rewrite`
compacts the file (atomically: a new file synced, renamed over the old one,
the directory synced) keeping only the records a predicate wants, after a
round is answered and whenever dead records outnumber live ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from edge_sdk._fs import fsync_dir
from edge_sdk.ids import is_id
from edge_sdk.protocol.limits import MAX_UPDATE_BYTES

__all__ = ["WitnessLog", "WitnessRecord", "read_witness_log"]

log = logging.getLogger("edgefl.keyholder")

_FIXED = 4 + 8 + 2  # payload length, round, device-id length

#: a record as read back: (device id, round, payload)
WitnessRecord = tuple[str, int, bytes]


def _encode(device_id: str, round_id: int, payload: bytes) -> bytes:
    name = device_id.encode()
    return b"".join(
        (
            len(payload).to_bytes(4, "big"),
            round_id.to_bytes(8, "big"),
            len(name).to_bytes(2, "big"),
            name,
            zlib.crc32(payload).to_bytes(4, "big"),
            payload,
        )
    )


def _scan(data: bytes) -> tuple[list[WitnessRecord], int]:
    """The whole records of ``data`` and where the last one ends."""
    out: list[WitnessRecord] = []
    pos = 0
    while pos + _FIXED <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        round_id = int.from_bytes(data[pos + 4 : pos + 12], "big")
        n = int.from_bytes(data[pos + 12 : pos + 14], "big")
        start = pos + _FIXED + n + 4
        if n == 0 or size > MAX_UPDATE_BYTES or start + size > len(data):
            break
        name = data[pos + _FIXED : pos + _FIXED + n].decode("ascii", "replace")
        crc = int.from_bytes(data[start - 4 : start], "big")
        payload = data[start : start + size]
        if not is_id(name) or zlib.crc32(payload) != crc:
            break
        out.append((name, round_id, payload))
        pos = start + size
    return out, pos


class WitnessLog:
    """Append-only, batch-synced copies of witnessed updates.

    Args:
        path: the log file (its folder is created, mode 0700; the file 0600).
    """

    def __init__(self, path: Path) -> None:
        """Open (or create) the log; a torn tail is cut before anything is appended."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not path.exists()
        records, end = _scan(path.read_bytes()) if not created else ([], 0)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: BinaryIO = os.fdopen(fd, "ab")
        if self._file.tell() != end:
            log.warning("witness log %s: cut a torn or corrupt record at byte %d", path, end)
            self._file.truncate(end)
            self._file.seek(end)
            os.fsync(self._file.fileno())
        if created:
            fsync_dir(path.parent)
        self._records = records
        self.count = len(records)  # records in the file (live or not)
        self.unsynced = 0

    def records(self) -> list[WitnessRecord]:
        """The records read at open (in file order); empty after :meth:`rewrite`."""
        out, self._records = self._records, []
        return out

    def append(self, device_id: str, round_id: int, payload: bytes) -> None:
        """Buffer one record (durable only after :meth:`sync`)."""
        self._file.write(_encode(device_id, round_id, payload))
        self.count += 1
        self.unsynced += 1

    def sync(self) -> None:
        """Write the buffered records and fsync the file."""
        if self.unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
            self.unsynced = 0

    def rewrite(self, keep: Callable[[str, int], bool]) -> int:
        """Compact: keep the records ``keep(device, round)`` wants (the first of each pair).

        The new file is written and fsynced beside the old one, renamed over
        it and the folder fsynced, so a crash leaves one or the other whole.

        Returns:
            How many records the new file holds.
        """
        self.sync()
        kept: list[bytes] = []
        seen: set[tuple[str, int]] = set()
        for device, round_id, payload in _read(self.path):
            if (device, round_id) not in seen and keep(device, round_id):
                seen.add((device, round_id))
                kept.append(_encode(device, round_id, payload))
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(b"".join(kept))
            out.flush()
            os.fsync(out.fileno())
        self._file.close()
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")
        self.count = len(kept)
        return self.count

    def close(self) -> None:
        """Sync and close."""
        with contextlib.suppress(OSError, ValueError):
            self.sync()
            self._file.close()


def _read(path: Path) -> Iterator[WitnessRecord]:
    records, _ = _scan(path.read_bytes()) if path.exists() else ([], 0)
    yield from records


def read_witness_log(path: Path) -> list[WitnessRecord]:
    """The whole records of a member's witness log (for tools and tests; read-only)."""
    return list(_read(path))
