"""The aggregator's copies of a round's accepted updates, for the witness relay.

One append-only file per round, ``{folder}/{round}.log``, of records
``[u16 device-id length][device id][u32 payload length][payload]`` (the
device's signed update, byte for byte as received), with an in-memory index
device -> (offset, length). Appending costs a couple of microseconds, a
file per update tens of times more (``edgefl bench scale`` prints both:
``relay_log_keep_us``, ``relay_file_per_update_us``). Records are flushed to
the OS with each batch commit, never fsynced: the relay is an availability
aid (a member checks every relayed update's device signature), so a copy
lost in a crash only means that
member waits, as it did before the relay existed.

A restarted aggregator reopens the round's file, rebuilds the index and cuts
a torn last record before appending. Files of rounds before the current one
are deleted.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import BinaryIO

from edge_sdk.ids import is_id
from edge_sdk.protocol.limits import MAX_UPDATE_BYTES

__all__ = ["RelayLog"]

log = logging.getLogger("edgefl.aggregator")


class RelayLog:
    """Kept copies of accepted updates, one append-only file per round.

    Args:
        folder: where the round files live (created on first use).
    """

    def __init__(self, folder: Path) -> None:
        """Create the log (no I/O until the first :meth:`keep`)."""
        self.folder = folder
        self._round: int | None = None
        self._file: BinaryIO | None = None
        self._index: dict[str, tuple[int, int]] = {}
        self._end = 0

    def _path(self, round_id: int) -> Path:
        return self.folder / f"{round_id}.log"

    def _open(self, round_id: int) -> None:
        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(round_id)
        index, end = _scan(path) if path.exists() else ({}, 0)
        handle = path.open("ab")
        if handle.tell() != end:  # a torn last record: cut it before appending
            handle.truncate(end)
            handle.seek(end)
        self._file, self._round, self._index, self._end = handle, round_id, index, end

    def keep(self, round_id: int, device_id: str, payload: bytes) -> None:
        """Append one accepted update of ``round_id`` (buffered; see :meth:`flush`)."""
        if self._round != round_id:
            self._open(round_id)
        assert self._file is not None
        name = device_id.encode()
        header = len(name).to_bytes(2, "big") + name + len(payload).to_bytes(4, "big")
        self._file.write(header + payload)
        self._index[device_id] = (self._end + len(header), len(payload))
        self._end += len(header) + len(payload)

    def flush(self) -> None:
        """Hand the buffered records to the OS (no fsync)."""
        if self._file is not None:
            self._file.flush()

    def get(self, round_id: int, device_id: str) -> bytes | None:
        """The kept update of a device in a round, or None."""
        if self._round != round_id:
            path = self._path(round_id)
            if not path.exists():
                return None
            self._open(round_id)
        where = self._index.get(device_id)
        if where is None:
            return None
        self.flush()
        offset, length = where
        with self._path(round_id).open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data if len(data) == length else None

    def drop_before(self, round_id: int) -> None:
        """Delete the files of rounds before ``round_id``."""
        if self._round is not None and self._round < round_id:
            self.close()
            self._round, self._index, self._end = None, {}, 0
        if not self.folder.exists():
            return
        for path in self.folder.glob("*.log"):
            if not path.stem.isdigit() or int(path.stem) < round_id:
                with contextlib.suppress(OSError):
                    path.unlink()

    def close(self) -> None:
        """Flush and close the open round file."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _scan(path: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Index a round file; returns the index and the end of its last whole record."""
    index: dict[str, tuple[int, int]] = {}
    data = path.read_bytes()
    pos = 0
    while pos + 2 <= len(data):
        n = int.from_bytes(data[pos : pos + 2], "big")
        start = pos + 2 + n + 4
        if n == 0 or start > len(data):
            break
        name = data[pos + 2 : pos + 2 + n].decode("ascii", "replace")
        length = int.from_bytes(data[pos + 2 + n : start], "big")
        if not is_id(name) or length > MAX_UPDATE_BYTES or start + length > len(data):
            break
        index[name] = (start, length)
        pos = start + length
    if pos < len(data):
        log.info("relay log %s: cut a torn record at byte %d", path, pos)
    return index, pos
