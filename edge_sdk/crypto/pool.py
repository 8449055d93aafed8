"""A durable pool of precomputed Paillier obfuscators ``r^n mod n^2``.

Computing ``r^n mod n^2`` is all of the cost of Paillier encryption (about
10 ms at 2048 bits on x86, several times more on a Pi). A device computes them
ahead of time (idle time, a background thread, ``edgefl keys precompute``) and
stores them here; encryption then costs one multiplication per plaintext.

Safety rules this module enforces:

* **Each obfuscator is used exactly once.** Reusing one lets anyone who sees
  two ciphertexts learn the difference of their plaintexts. :meth:`take_many`
  overwrites the records it hands out with zeros and fsyncs the file
  *before* returning them, so after a crash (even ``kill -9`` between the
  consumption and the return) a value is lost, never handed out twice.
  Zeroed records are skipped and trimmed later.
* **Pool files never mix keys.** The pool lives in a directory named by the
  key fingerprint, and every segment file repeats the fingerprint in its
  header; a segment for another key is an error, not a source of values.
* **Obfuscators are secrets.** Anyone who learns ``r^n`` decrypts the
  ciphertext made with it. Files are created 0600 inside a 0700 directory.
  Overwriting with zeros is best effort on flash storage (wear levelling may
  keep old copies): keep the pool on the device's encrypted storage.

On-disk layout (all integers big-endian): a directory ``<root>/<fingerprint>/``
holding segment files ``seg-*.obf``; each is a 40-byte header (``b"EFOB"``,
u8 version 1, u16 record width W = byte length of ``n^2``, u8 reserved 0,
32-byte key fingerprint) followed by records of W bytes, each one ``r^n mod
n^2``. Records are taken from the end of the file. Concurrent processes
serialise on ``flock`` of ``<root>/<fingerprint>/.lock``.

DJN pools (``ObfuscatorPool(..., djn=DJNObfuscatorSource(...))``) hold
obfuscators ``hs^a mod n^2`` *and their secret exponents* ``a`` (the binding
proof needs them). They live in ``<root>/<fingerprint>/djn-<base digest[:32]>/``
in version-2 segments: a 74-byte header (``b"EFOB"``, u8 version 2, u16 W,
u8 kind 1 = DJN, 32-byte key fingerprint, 32-byte base digest, u16 E = byte
length of an exponent) followed by records of ``W + E`` bytes (the
obfuscator, then ``a``, both big-endian). Consumption zeroes the whole record
(obfuscator and exponent) and fsyncs before returning, exactly as for
``r^n``. A version-1 (``r^n``) segment in a DJN directory, a version-2 segment
in an ``r^n`` directory, or a segment naming another key or base is refused
with :class:`PoolCorruptedError`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk._fs import atomic_write
from edge_sdk.crypto import _raw
from edge_sdk.crypto._gmp import mpz_from_bytes
from edge_sdk.crypto.keys import PaillierPublicKey
from edge_sdk.errors import CryptoError
from edge_sdk.randomness import RandomSource, default_random

if TYPE_CHECKING:
    from edge_sdk.crypto.djn import DJNObfuscatorSource

__all__ = ["BackgroundFill", "ObfuscatorPool", "PoolCorruptedError"]

_log = logging.getLogger(__name__)

_MAGIC = b"EFOB"
_VERSION = 1
_HEADER = struct.Struct(">4sBHB32s")
_DJN_VERSION = 2
_KIND_DJN = 1
# magic, version 2, obfuscator width W, kind, key fingerprint, base digest, exponent width E
_DJN_HEADER = struct.Struct(">4sBHB32s32sH")
_SEGMENT_GLOB = "seg-*.obf"
_DEFAULT_SEGMENT = 256

# Test seam: called with the values just consumed, after the consumption is
# durable and before they are returned. The crash test sets it in a child
# process to SIGKILL itself at exactly that point. Never set in production.
_after_consume_hook: Callable[[list[int]], None] | None = None


class PoolCorruptedError(CryptoError):
    """A pool segment is unreadable or belongs to another key."""

    reason = "pool_corrupted"


class ObfuscatorPool:
    """Precomputed obfuscators for one public key, consumed durably once each.

    Args:
        path_dir: root directory of pools (one subdirectory per key fingerprint).
        public_key: the key the obfuscators are for.
        segment_size: records per segment file written by :meth:`fill`.
        djn: hold DJN obfuscators ``hs^a`` from this source, with their
            exponents ``a`` (default: classic ``r^n`` obfuscators).

    Raises:
        CryptoError: ``djn`` is for another public key.
    """

    def __init__(
        self,
        path_dir: str | os.PathLike[str],
        public_key: PaillierPublicKey,
        *,
        segment_size: int = _DEFAULT_SEGMENT,
        djn: DJNObfuscatorSource | None = None,
    ) -> None:
        """Open (creating if needed) the pool directory for ``public_key`` (and base)."""
        if segment_size < 1:
            raise ValueError(f"segment_size must be >= 1, got {segment_size}")
        if djn is not None and djn.public_key != public_key:
            raise CryptoError("the DJN obfuscator source belongs to a different public key")
        self.public_key = public_key
        self.djn = djn
        self.root = Path(path_dir)
        key_dir = self.root / public_key.fingerprint
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(key_dir, 0o700)
        self.directory = key_dir if djn is None else key_dir / f"djn-{djn.base.digest[:32]}"
        if djn is not None:
            self.directory.mkdir(exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
        self._width = public_key.ciphertext_bytes
        self._exp_width = 0 if djn is None else (djn.base.exponent_bits + 7) // 8
        self._record = self._width + self._exp_width
        self._segment_size = segment_size
        if djn is None:
            self._header = _HEADER.pack(
                _MAGIC, _VERSION, self._width, 0, bytes.fromhex(public_key.fingerprint)
            )
        else:
            self._header = _DJN_HEADER.pack(
                _MAGIC,
                _DJN_VERSION,
                self._width,
                _KIND_DJN,
                bytes.fromhex(public_key.fingerprint),
                bytes.fromhex(djn.base.digest),
                self._exp_width,
            )
        self._thread_lock = threading.Lock()
        # Counters of this process: how encryption got its obfuscators.
        self.taken_from_pool = 0
        self.computed_on_demand = 0

    @property
    def kind(self) -> str:
        """``"rn"`` (classic ``r^n``) or ``"djn"`` (``hs^a`` with exponents)."""
        return "rn" if self.djn is None else "djn"

    def __repr__(self) -> str:
        return f"ObfuscatorPool({str(self.directory)!r})"

    # -- locking -----------------------------------------------------------------

    class _Locked:
        def __init__(self, pool: ObfuscatorPool) -> None:
            self._pool = pool
            self._fd = -1

        def __enter__(self) -> None:
            self._pool._thread_lock.acquire()
            try:
                path = self._pool.directory / ".lock"
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                if self._fd >= 0:
                    os.close(self._fd)
                self._pool._thread_lock.release()
                raise

        def __exit__(self, *exc: object) -> None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            finally:
                self._pool._thread_lock.release()

    # -- reading -----------------------------------------------------------------

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob(_SEGMENT_GLOB))

    def _open_segment(self, path: Path) -> tuple[int, int]:
        """Open a segment read-write; return ``(fd, record_count)`` after header checks."""
        fd = os.open(path, os.O_RDWR)
        try:
            header_size = len(self._header)
            header = os.pread(fd, header_size, 0)
            self._check_header(path, header)
            body = os.fstat(fd).st_size - header_size
            if body % self._record:
                raise PoolCorruptedError(f"pool segment {path.name} has a partial record")
            return fd, body // self._record
        except BaseException:
            os.close(fd)
            raise

    def _check_header(self, path: Path, header: bytes) -> None:
        if len(header) >= 5 and header[:4] == _MAGIC and header[4] != self._header[4]:
            kinds = {_VERSION: "r^n", _DJN_VERSION: "DJN"}
            found = kinds.get(header[4])
            if found is not None:
                raise PoolCorruptedError(
                    f"pool segment {path.name} holds {found} obfuscators, this pool holds "
                    f"{kinds[self._header[4]]} ones; refusing to mix kinds"
                )
        if len(header) != len(self._header):
            raise PoolCorruptedError(f"pool segment {path.name} has a short header")
        if self.djn is None:
            magic, version, width, _reserved, fingerprint = _HEADER.unpack(header)
            if magic != _MAGIC or version != _VERSION:
                raise PoolCorruptedError(f"pool segment {path.name} is not a version-1 pool file")
        else:
            magic, version, width, kind, fingerprint, digest, exp_width = _DJN_HEADER.unpack(header)
            if magic != _MAGIC or version != _DJN_VERSION or kind != _KIND_DJN:
                raise PoolCorruptedError(f"pool segment {path.name} is not a DJN pool file")
            if digest.hex() != self.djn.base.digest or exp_width != self._exp_width:
                raise PoolCorruptedError(
                    f"pool segment {path.name} belongs to DJN base {digest.hex()[:16]}..., "
                    f"not {self.djn.base.digest[:16]}...; refusing to mix bases"
                )
        if fingerprint.hex() != self.public_key.fingerprint or width != self._width:
            raise PoolCorruptedError(
                f"pool segment {path.name} belongs to key {fingerprint.hex()[:16]}..., "
                f"not {self.public_key.fingerprint[:16]}...; refusing to mix keys"
            )

    def size(self) -> int:
        """Number of stored obfuscators (zeroed leftovers of a crash included)."""
        total = 0
        for path in self._segments():
            try:
                fd, count = self._open_segment(path)
            except FileNotFoundError:
                continue
            os.close(fd)
            total += count
        return total

    def take(self, *, rng: RandomSource | None = None) -> int:
        """Consume one obfuscator (computed fresh when the pool is empty)."""
        return int(self.take_many(1, rng=rng)[0])

    def take_stored(self, count: int) -> list[Any]:
        """Consume up to ``count`` stored obfuscators; durable before returning.

        Returns:
            Between 0 and ``count`` values (gmpy2 ``mpz``), each never returned before.
        """
        return [obf for obf, _ in self._take_stored(count)]

    def take_stored_with_exponents(self, count: int) -> list[tuple[Any, int]]:
        """Consume up to ``count`` stored DJN ``(obfuscator, exponent)`` pairs; durable.

        Raises:
            CryptoError: this is an ``r^n`` pool (it has no exponents).
        """
        self._require_djn()
        return self._take_stored(count)

    def _require_djn(self) -> DJNObfuscatorSource:
        if self.djn is None:
            raise CryptoError("this obfuscator pool holds r^n values, which have no exponents")
        return self.djn

    def _take_stored(self, count: int) -> list[tuple[Any, int]]:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        out: list[tuple[Any, int]] = []
        if count == 0:
            return out
        with self._Locked(self):
            while len(out) < count:
                segments = self._segments()
                if not segments:
                    break
                self._take_from(segments[-1], count - len(out), out)
        hook = _after_consume_hook
        if hook is not None and out:
            hook([int(v) for v, _ in out])
        return out

    def _take_from(self, path: Path, wanted: int, out: list[tuple[Any, int]]) -> None:
        """Consume up to ``wanted`` records from the end of one segment into ``out``."""
        width, record, nsq = self._width, self._record, self.public_key._nsq
        try:
            fd, available = self._open_segment(path)
        except FileNotFoundError:
            return
        try:
            take = min(available, wanted)
            start = len(self._header) + (available - take) * record
            raw = os.pread(fd, take * record, start)
            if len(raw) != take * record:
                raise PoolCorruptedError(f"pool segment {path.name} read short")
            if take:
                # The consumption point: zero the records and make that durable
                # before any of them is returned.
                os.pwrite(fd, bytes(take * record), start)
                os.fsync(fd)
                os.ftruncate(fd, start)
        finally:
            os.close(fd)
        if available == take:
            path.unlink(missing_ok=True)
        frm = mpz_from_bytes
        exp_limit = 0 if self.djn is None else 1 << self.djn.base.exponent_bits
        for i in range(take - 1, -1, -1):
            offset = i * record
            value = frm(raw[offset : offset + width], "big")
            if value == 0:
                continue  # zeroed by an interrupted earlier take
            if not 0 < value < nsq:
                raise PoolCorruptedError(f"pool segment {path.name} holds an invalid value")
            exponent = 0
            if exp_limit:
                exponent = int.from_bytes(raw[offset + width : offset + record], "big")
                if exponent >= exp_limit:
                    raise PoolCorruptedError(f"pool segment {path.name} holds an invalid exponent")
            out.append((value, exponent))

    def take_many(self, count: int, *, rng: RandomSource | None = None) -> list[Any]:
        """Consume ``count`` obfuscators: stored ones first, then fresh ones.

        Args:
            count: how many.
            rng: randomness for fresh values (default: the OS CSPRNG).

        Returns:
            ``count`` distinct-use obfuscators (gmpy2 ``mpz``).
        """
        if self.djn is not None:
            return [obf for obf, _ in self.take_many_with_exponents(count, rng=rng)]
        out = self.take_stored(count)
        self.taken_from_pool += len(out)
        self.computed_on_demand += count - len(out)
        if len(out) < count:
            _log.debug("obfuscator pool short by %d; computing on the fly", count - len(out))
            source = default_random() if rng is None else rng
            out.extend(
                _raw.compute_obfuscator(self.public_key, _raw.random_unit(self.public_key, source))
                for _ in range(count - len(out))
            )
        return out

    def take_many_with_exponents(
        self, count: int, *, rng: RandomSource | None = None
    ) -> list[tuple[Any, int]]:
        """Consume ``count`` DJN ``(obfuscator, exponent)`` pairs: stored first, then fresh.

        Raises:
            CryptoError: this is an ``r^n`` pool.
        """
        djn = self._require_djn()
        out = self._take_stored(count)
        self.taken_from_pool += len(out)
        self.computed_on_demand += count - len(out)
        if len(out) < count:
            _log.debug("DJN obfuscator pool short by %d; computing on the fly", count - len(out))
            out.extend(djn.draw_many(count - len(out), rng))
        return out

    # -- writing -----------------------------------------------------------------

    def fill(self, count: int, rng: RandomSource | None = None, workers: int | None = None) -> int:
        """Compute ``count`` fresh obfuscators and store them durably.

        Values are written to a temporary file, fsynced and renamed into place
        segment by segment, so an interrupted fill loses only unfinished work.

        Args:
            count: how many to add.
            rng: randomness for ``r`` (default: the OS CSPRNG).
            workers: processes for the ``r^n`` ``powmod`` work (gmpy2 keeps the GIL);
                ignored by DJN pools (table-based, ~1 ms per value in-process).

        Returns:
            The pool size afterwards.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        source = default_random() if rng is None else rng
        done = 0
        while done < count:
            batch = min(self._segment_size, count - done)
            if self.djn is not None:
                # Table-based: ~1 ms each in-process, so no worker processes.
                self._write_segment(self.djn.draw_many(batch, source))
            else:
                randoms = [_raw.random_unit(self.public_key, source) for _ in range(batch)]
                values = _raw.obfuscators_from_randoms(self.public_key, randoms, workers=workers)
                self._write_segment([(v, 0) for v in values])
            done += batch
        return self.size()

    def _write_segment(self, records: list[tuple[Any, int]]) -> None:
        width, exp_width = self._width, self._exp_width
        if exp_width:
            body = b"".join(
                int(v).to_bytes(width, "big") + a.to_bytes(exp_width, "big") for v, a in records
            )
        else:
            body = b"".join(int(v).to_bytes(width, "big") for v, _ in records)
        payload = self._header + body
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.obf"
        # the one crash-safe write helper: temporary file, fsync, rename, fsync dir
        atomic_write(self.directory / name, payload, mode=0o600)

    def start_background_fill(
        self,
        target: int,
        *,
        batch: int = 16,
        interval_s: float = 1.0,
        rng: RandomSource | None = None,
        workers: int | None = None,
    ) -> BackgroundFill:
        """Keep the pool topped up to ``target`` from a daemon thread.

        With ``workers`` unset the thread computes in-process; each ``powmod``
        holds the GIL for its full duration (~10 ms at 2048 bits), so give
        ``workers=1`` or more to move the work to processes on busy devices.
        """
        filler = BackgroundFill(
            self, target, batch=batch, interval_s=interval_s, rng=rng, workers=workers
        )
        filler.start()
        return filler


class BackgroundFill:
    """A daemon thread that keeps a pool at a target size; ``stop()`` ends it."""

    def __init__(
        self,
        pool: ObfuscatorPool,
        target: int,
        *,
        batch: int,
        interval_s: float,
        rng: RandomSource | None,
        workers: int | None,
    ) -> None:
        """Prepare (not start) the filler; see :meth:`ObfuscatorPool.start_background_fill`."""
        if target < 0 or batch < 1:
            raise ValueError(f"need target >= 0 and batch >= 1, got {target}, {batch}")
        self._pool = pool
        self._target = target
        self._batch = batch
        self._interval = interval_s
        self._rng = rng
        self._workers = workers
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="edgefl-obfuscator-fill", daemon=True
        )
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                missing = self._target - self._pool.size()
                if missing <= 0:
                    self._stop.wait(self._interval)
                    continue
                self._pool.fill(min(missing, self._batch), rng=self._rng, workers=self._workers)
        except BaseException as exc:  # reported through .error, logged
            self.error = exc
            _log.exception("background obfuscator fill failed")

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread.is_alive()
