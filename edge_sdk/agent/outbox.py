"""The device's on-disk outbox ("flash"): sealed updates awaiting receipts.

Each entry is the exact encoded EncryptedUpdate, written atomically and
durably before it is first published, so a reboot resends the same bytes:
the same noise, the same obfuscators, the same signature. A file that does
not decode is moved aside (``*.corrupt``) and reported, never resent.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from edge_sdk._fs import TEMP_PATTERN, atomic_write, fsync_dir
from edge_sdk.agent.session import OutboxEntry
from edge_sdk.errors import DecodeError
from edge_sdk.protocol import EncryptedUpdate

__all__ = ["Outbox"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"round-(\d{1,19})\.update")
_TMP = re.compile(TEMP_PATTERN)


class Outbox:
    """A folder of pending updates, one file per round."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.quarantined: list[Path] = []
        self.removed_temporaries = self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a crash inside ``atomic_write``.

        ``atomic_write`` names its temporary ``.<name>.tmp-<pid>-<random>``; one left
        behind never holds a published envelope (the rename did not happen,
        or happened and the temporary is gone), and each crash would leave
        another one. Returns how many were removed.
        """
        stale = [
            p
            for p in self.folder.iterdir()
            if (m := _TMP.fullmatch(p.name)) is not None and _NAME.fullmatch(m.group("name"))
        ]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            fsync_dir(self.folder)
            log.warning("removed %d stale temporary file(s) from %s", len(stale), self.folder)
        return len(stale)

    def _path(self, round_id: int) -> Path:
        return self.folder / f"round-{round_id}.update"

    def store(self, update: EncryptedUpdate) -> OutboxEntry:
        """Persist an update (fsync file and folder) and return its entry."""
        payload = update.to_bytes()
        atomic_write(self._path(update.round_id), payload, mode=0o600)
        return OutboxEntry(
            round_id=update.round_id, update_digest=update.update_digest, payload=payload
        )

    def remove(self, round_id: int) -> None:
        """Delete a round's entry (after its receipt); durable."""
        path = self._path(round_id)
        if path.exists():
            path.unlink()
            fsync_dir(self.folder)

    def entries(self) -> list[OutboxEntry]:
        """All readable entries, oldest round first; broken files are quarantined."""
        found: list[OutboxEntry] = []
        for path in sorted(self.folder.iterdir()):
            match = _NAME.fullmatch(path.name)
            if match is None:
                continue
            try:
                update = EncryptedUpdate.from_bytes(path.read_bytes())
                if update.round_id != int(match.group(1)):
                    raise DecodeError("round id differs from the file name")
            except (DecodeError, OSError) as exc:
                target = path.with_name(path.name + ".corrupt")
                path.replace(target)
                fsync_dir(self.folder)
                self.quarantined.append(target)
                log.error("outbox entry %s is unreadable (%s); moved to %s", path, exc, target)
                continue
            found.append(
                OutboxEntry(
                    round_id=update.round_id,
                    update_digest=update.update_digest,
                    payload=path.read_bytes(),
                )
            )
        return sorted(found, key=lambda e: e.round_id)

    def latest(self) -> OutboxEntry | None:
        """The newest pending entry; older ones are superseded and removed."""
        entries = self.entries()
        for stale in entries[:-1]:
            self.remove(stale.round_id)
        return entries[-1] if entries else None
