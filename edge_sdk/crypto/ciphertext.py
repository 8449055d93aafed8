"""Ciphertext vectors: encryption, validation, homomorphic sums, decryption.

Encryption is ``c = (1 + n*m) * r^n mod n^2`` (generator ``g = n + 1``).
``r^n`` (the obfuscator) is all of the cost; it is either computed fresh from
the injected randomness or taken from an :class:`~edge_sdk.crypto.ObfuscatorPool`
that consumes each value durably exactly once.

A vector serialises as one blob: every ciphertext as fixed-width big-endian
bytes (the byte length of ``n^2``: 512 bytes for a 2048-bit key), concatenated.
Decoding an untrusted blob checks the exact length, ``0 < c < n^2`` and
``gcd(c, n) = 1`` for every element: a peer can otherwise shift a sum
(``n - 100`` as a "ciphertext") or poison it (``0``, multiples of a prime of n).
Decryption (key holder only) uses CRT.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

import gmpy2

from edge_sdk.crypto import _raw
from edge_sdk.crypto._gmp import mpz_from_bytes
from edge_sdk.crypto._parallel import default_workers, process_executor
from edge_sdk.crypto.keys import PaillierPrivateKey, PaillierPublicKey
from edge_sdk.errors import CryptoError, InvalidCiphertextError
from edge_sdk.randomness import RandomSource, default_random

if TYPE_CHECKING:
    from edge_sdk.crypto.pool import ObfuscatorPool

__all__ = [
    "CiphertextAccumulator",
    "CiphertextVector",
    "decrypt",
    "encrypt",
    "sum_ciphertexts",
]

# Below this many modular multiplications, worker start-up costs more than it saves.
_PARALLEL_MIN_MULS = 50_000


class CiphertextVector:
    """An immutable vector of Paillier ciphertexts under one public key.

    Build one with :func:`encrypt`, :func:`sum_ciphertexts` or
    :meth:`from_bytes` (untrusted input). The constructor validates too.
    """

    __slots__ = ("_blob", "_public_key", "_values")

    _values: tuple[Any, ...]
    _blob: bytes | None

    def __init__(self, public_key: PaillierPublicKey, values: Iterable[int]) -> None:
        """Validate and wrap ciphertext integers.

        Raises:
            InvalidCiphertextError: an element is out of range or not a unit mod n.
        """
        vals = tuple(values)
        for index, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, int | type(gmpy2.mpz(0))):
                raise TypeError(f"ciphertext {index} must be an int, got {type(v).__name__}")
        vals = tuple(gmpy2.mpz(v) for v in vals)
        _validate(public_key, vals)
        self._public_key = public_key
        self._values = vals
        self._blob = None

    @classmethod
    def _trusted(
        cls, public_key: PaillierPublicKey, values: tuple[Any, ...], blob: bytes | None = None
    ) -> CiphertextVector:
        obj = cls.__new__(cls)
        obj._public_key = public_key
        obj._values = values
        obj._blob = blob
        return obj

    @property
    def public_key(self) -> PaillierPublicKey:
        """The key these ciphertexts are under."""
        return self._public_key

    @property
    def values(self) -> tuple[int, ...]:
        """The ciphertexts as Python ints."""
        return tuple(int(v) for v in self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[int]:
        return (int(v) for v in self._values)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CiphertextVector)
            and other._public_key == self._public_key
            and other._values == self._values
        )

    def __hash__(self) -> int:
        return hash((self._public_key.fingerprint, self.to_bytes()))

    def __repr__(self) -> str:
        return f"CiphertextVector(len={len(self)}, key={self._public_key.fingerprint[:16]}...)"

    def to_bytes(self) -> bytes:
        """Concatenated fixed-width big-endian ciphertexts (``len * ciphertext_bytes``)."""
        if self._blob is None:
            width = self._public_key.ciphertext_bytes
            self._blob = b"".join([int(v).to_bytes(width, "big") for v in self._values])
        return self._blob

    @classmethod
    def from_bytes(cls, blob: bytes, public_key: PaillierPublicKey, count: int) -> CiphertextVector:
        """Decode and validate an untrusted blob of exactly ``count`` ciphertexts.

        Args:
            blob: the serialised vector.
            public_key: the federation's key.
            count: expected number of ciphertexts (from the packing spec).

        Returns:
            The vector.

        Raises:
            InvalidCiphertextError: wrong length (``reason="length"``), an
                element outside ``(0, n^2)`` (``"range"``) or sharing a factor
                with ``n`` (``"not_unit"``). The message names the index.
        """
        blob = bytes(blob)
        width = public_key.ciphertext_bytes
        if count < 0 or len(blob) != count * width:
            raise InvalidCiphertextError(
                f"ciphertext blob is {len(blob)} bytes, expected {count} x {width}",
                reason="length",
            )
        frm = mpz_from_bytes
        values = tuple(frm(blob[i : i + width], "big") for i in range(0, len(blob), width))
        _validate(public_key, values)
        return cls._trusted(public_key, values, blob)


def _validate(public_key: PaillierPublicKey, values: Sequence[Any]) -> None:
    nsq, n = public_key._nsq, public_key._n
    for index, c in enumerate(values):
        if not 0 < c < nsq:
            raise InvalidCiphertextError(f"ciphertext {index} is outside (0, n^2)", reason="range")
    # Every c is a unit mod n iff their product mod n is (n = p*q): one gcd for
    # the whole vector instead of one per element (a mulmod mod n costs ~1/8).
    prod = gmpy2.mpz(1)
    for c in values:
        prod = prod * c % n
    if gmpy2.gcd(prod, n) != 1:
        for index, c in enumerate(values):
            if gmpy2.gcd(c, n) != 1:
                raise InvalidCiphertextError(
                    f"ciphertext {index} is not a unit modulo n", reason="not_unit"
                )


def encrypt(
    public_key: PaillierPublicKey,
    plaintexts: Sequence[int],
    *,
    pool: ObfuscatorPool | None = None,
    rng: RandomSource | None = None,
    workers: int | None = None,
) -> CiphertextVector:
    """Encrypt packed plaintexts.

    Args:
        public_key: the federation's key.
        plaintexts: integers in ``[0, n)`` (output of :func:`~edge_sdk.crypto.pack`).
        pool: take precomputed obfuscators from here (consumed durably before
            this returns); a short pool is topped up with fresh ones.
        rng: randomness for fresh obfuscators (default: the OS CSPRNG).
        workers: processes for fresh obfuscators (default 1).

    Returns:
        The ciphertext vector.

    Raises:
        ValueError: a plaintext is outside ``[0, n)``.
        CryptoError: the pool belongs to another key.
    """
    n = public_key.n
    for index, m in enumerate(plaintexts):
        if not 0 <= m < n:
            raise ValueError(f"plaintext {index} is outside [0, n)")
    if pool is not None:
        if pool.public_key != public_key:
            raise CryptoError("obfuscator pool belongs to a different public key")
        obfuscators = pool.take_many(len(plaintexts), rng=rng)
    else:
        source = default_random() if rng is None else rng
        randoms = [_raw.random_unit(public_key, source) for _ in plaintexts]
        obfuscators = _raw.obfuscators_from_randoms(public_key, randoms, workers=workers)
    mn, nsq = public_key._n, public_key._nsq
    values = tuple((mn * m + 1) * rn % nsq for m, rn in zip(plaintexts, obfuscators, strict=True))
    return CiphertextVector._trusted(public_key, values)


def _check_same(public_key: PaillierPublicKey, vectors: Sequence[CiphertextVector]) -> int:
    if not vectors:
        raise ValueError("need at least one vector to sum")
    length = len(vectors[0])
    for index, vec in enumerate(vectors):
        if vec.public_key != public_key:
            raise CryptoError(f"vector {index} is under a different public key")
        if len(vec) != length:
            raise ValueError(f"vector {index} has length {len(vec)}, expected {length}")
    return length


def _product(nsq: Any, vectors: Sequence[tuple[Any, ...]]) -> list[Any]:
    acc = list(vectors[0])
    for vec in vectors[1:]:
        acc = [a * c % nsq for a, c in zip(acc, vec, strict=True)]
    return acc


def _sum_shared(args: tuple[int, int, int, str, int, int]) -> bytes:
    """Worker: multiply vectors ``first .. first + count`` of a shared-memory block.

    The parent writes all blobs once into shared memory and every worker
    starts at once; sending them through the pool's pipe instead serialises
    the workers' start (the second waits for the first one's megabytes).
    """
    nsq_int, width, length, name, first, count = args
    shm = _attach(name)
    try:
        view = shm.buf
        assert view is not None
        nsq = gmpy2.mpz(nsq_int)
        frm = mpz_from_bytes
        stride = width * length
        start = first * stride
        acc = [
            frm(bytes(view[start + i * width : start + (i + 1) * width]), "big")
            for i in range(length)
        ]
        for k in range(1, count):
            base = start + k * stride
            acc = [
                a * frm(bytes(view[base + i * width : base + (i + 1) * width]), "big") % nsq
                for i, a in enumerate(acc)
            ]
        del view
        return b"".join([int(a).to_bytes(width, "big") for a in acc])
    finally:
        shm.close()


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to the parent's block without adopting it.

    Before Python 3.13, attaching registers the block with this process's
    resource tracker as if it owned it; the parent owns and unlinks it.
    """
    shm = shared_memory.SharedMemory(name=name)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except (AttributeError, KeyError, ValueError):  # pragma: no cover - other Pythons
        pass
    return shm


def sum_ciphertexts(
    public_key: PaillierPublicKey,
    vectors: Sequence[CiphertextVector],
    *,
    workers: int | None = None,
    executor: Executor | None = None,
) -> CiphertextVector:
    """Homomorphically add vectors: element-wise product modulo ``n^2``.

    Large sums are split over worker processes by partitions of the vector
    list; the partial products are multiplied at the end.

    Args:
        public_key: the key all vectors are under.
        vectors: validated vectors of equal length.
        workers: processes to use; default: all cores for large sums, 1 for small.
            One worker without an executor sums in this process.
        executor: an existing process pool to use (keeps workers warm).

    Returns:
        The encrypted sum.

    Raises:
        ValueError: no vectors, or lengths differ.
        CryptoError: a vector is under another key.
    """
    length = _check_same(public_key, vectors)
    nsq = public_key._nsq
    if workers is None:
        workers = default_workers() if len(vectors) * length >= _PARALLEL_MIN_MULS else 1
    workers = max(1, min(workers, len(vectors) // 2))
    if (workers == 1 and executor is None) or length == 0:
        return CiphertextVector._trusted(
            public_key, tuple(_product(nsq, [v._values for v in vectors]))
        )
    size = -(-len(vectors) // workers)
    width = public_key.ciphertext_bytes
    stride = width * length
    shm = shared_memory.SharedMemory(create=True, size=stride * len(vectors))
    try:
        buf = shm.buf
        assert buf is not None
        for k, vector in enumerate(vectors):
            buf[k * stride : (k + 1) * stride] = vector.to_bytes()
        del buf
        jobs = [
            (public_key.nsquare, width, length, shm.name, i, min(size, len(vectors) - i))
            for i in range(0, len(vectors), size)
        ]
        if executor is not None:
            partials = list(executor.map(_sum_shared, jobs))
        else:
            with process_executor(len(jobs)) as own:
                partials = list(own.map(_sum_shared, jobs))
    finally:
        shm.close()
        shm.unlink()
    frm = mpz_from_bytes
    parts = [
        tuple(frm(p[i * width : (i + 1) * width], "big") for i in range(length)) for p in partials
    ]
    return CiphertextVector._trusted(public_key, tuple(_product(nsq, parts)))


class CiphertextAccumulator:
    """A running encrypted sum the aggregator folds updates into one at a time.

    Starts at the trivial encryption of zero (all ones). ``value`` is a
    snapshot; adding more later does not change a returned snapshot.
    """

    __slots__ = ("_acc", "_count", "_length", "_public_key")

    def __init__(self, public_key: PaillierPublicKey, length: int) -> None:
        """Start an empty sum of vectors of ``length`` ciphertexts."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self._public_key = public_key
        self._length = length
        self._acc: list[Any] = [gmpy2.mpz(1)] * length
        self._count = 0

    @classmethod
    def from_vector(cls, vector: CiphertextVector, count: int) -> CiphertextAccumulator:
        """Resume from a persisted partial sum of ``count`` contributions."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        acc = cls(vector.public_key, len(vector))
        acc._acc = list(vector._values)
        acc._count = count
        return acc

    @property
    def count(self) -> int:
        """Number of vectors added so far."""
        return self._count

    @property
    def length(self) -> int:
        """Ciphertexts per vector."""
        return self._length

    def add(self, vector: CiphertextVector) -> None:
        """Fold one validated vector into the sum.

        Raises:
            CryptoError: another key. ValueError: another length.
        """
        self.merge(vector, 1)

    def merge(self, vector: CiphertextVector, count: int) -> None:
        """Fold in a partial sum of ``count`` contributions (another accumulator's value).

        Raises:
            CryptoError: another key. ValueError: another length, or ``count`` < 0.
        """
        if vector.public_key != self._public_key:
            raise CryptoError("vector is under a different public key")
        if len(vector) != self._length:
            raise ValueError(f"vector has length {len(vector)}, expected {self._length}")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        nsq = self._public_key._nsq
        self._acc = [a * c % nsq for a, c in zip(self._acc, vector._values, strict=True)]
        self._count += count

    @property
    def value(self) -> CiphertextVector:
        """The current encrypted sum."""
        return CiphertextVector._trusted(self._public_key, tuple(self._acc))


def decrypt(private_key: PaillierPrivateKey, vector: CiphertextVector) -> list[int]:
    """Decrypt every ciphertext (key holder only; CRT).

    Decrypt only aggregates of at least ``min_clients`` verified contributions:
    decrypting a single device's update reveals it.

    Raises:
        CryptoError: the vector is under another key.
    """
    if vector.public_key != private_key.public_key:
        raise CryptoError("vector is under a different public key than the private key")
    return [private_key.raw_decrypt(c) for c in vector._values]
