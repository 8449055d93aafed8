"""Crash-safe file helpers: atomic replace with fsync of file and directory."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TEMP_PATTERN",
    "atomic_write",
    "check_private",
    "fsync_dir",
    "remove_stale_temporaries",
]

# Names of the temporaries atomic_write leaves behind when killed mid-write.
TEMP_PATTERN = r"\.(?P<name>.+)\.tmp-\d+-[A-Za-z0-9_]+"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk, so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    data: bytes,
    *,
    mode: int = 0o600,
    step: Callable[[str], None] | None = None,
) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a temporary file in the same directory (created with
    ``mode``), which is fsynced, renamed over ``path``, and the directory is
    fsynced: after a crash at any point ``path`` holds either the old or the
    new content, never a mix.

    Args:
        path: the file to replace.
        data: its new content.
        mode: permissions of the new file (set before any byte is written).
        step: called with ``tmp_written``, ``tmp_synced``, ``renamed`` and
            ``dir_synced`` as each point is passed (crash tests kill there).
    """
    hook = step or _no_step
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temporary name: ".<name>.tmp-<pid>-<random>" (see TEMP_PATTERN).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, mode)  # before any byte is written: no readable window
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            hook("tmp_written")
            os.fsync(fd)
        finally:
            os.close(fd)
        hook("tmp_synced")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    hook("renamed")
    fsync_dir(target.parent)
    hook("dir_synced")


def _no_step(name: str) -> None:
    """No crash hook."""


def remove_stale_temporaries(target: Path) -> int:
    """Delete temporary files a killed :func:`atomic_write` of ``target`` left; return how many."""
    pattern = re.compile(TEMP_PATTERN)
    removed = 0
    if not target.parent.is_dir():
        return 0
    for p in target.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is not None and m.group("name") == target.name:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def check_private(path: Path) -> None:
    """Raise PermissionError when ``path`` is readable by group or others."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
