"""Injected randomness: the OS's CSPRNG by default, a deterministic stream for tests.

Every random decision that matters for privacy or security (stochastic
rounding, DP noise, Paillier obfuscators) draws from a :class:`RandomSource`.
The production default, :class:`SystemRandom`, reads the operating system's
cryptographic generator (``os.urandom``). :class:`DeterministicRandom` is a
test seam: a ChaCha20 keystream keyed by a seed, so tests get exact vectors.
Never use it on a device: anyone who knows the seed knows the noise.

Numpy's generators (PCG64, MT19937) are not used for noise: they are not
cryptographically secure, and a seeded global RNG makes noise predictable.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = [
    "DeterministicRandom",
    "RandomSource",
    "SystemRandom",
    "default_random",
    "randbelow",
    "uniform_uint64",
]


@runtime_checkable
class RandomSource(Protocol):
    """A source of uniformly random bytes."""

    @property
    def secure(self) -> bool:
        """True only for a cryptographically secure, unpredictable source."""
        ...

    def random_bytes(self, n: int) -> bytes:
        """Return ``n`` uniformly random bytes."""
        ...


class SystemRandom:
    """The OS's cryptographic random generator (``os.urandom``): the default."""

    __slots__ = ()

    @property
    def secure(self) -> bool:
        """Always True: the OS generator is a CSPRNG."""
        return True

    def random_bytes(self, n: int) -> bytes:
        """Return ``n`` bytes from ``os.urandom``."""
        if n < 0:
            raise ValueError(f"byte count must be >= 0, got {n}")
        return os.urandom(n)

    def __repr__(self) -> str:
        return "SystemRandom()"


class DeterministicRandom:
    """A reproducible ChaCha20 keystream for tests and known-answer vectors.

    Dangerous on a device: the stream is a function of ``seed`` alone, so the
    noise it drives gives no privacy against anyone who knows the seed.
    """

    __slots__ = ("_encryptor", "_seed")

    def __init__(self, seed: int | bytes | str) -> None:
        if isinstance(seed, int):
            seed_bytes = seed.to_bytes((max(seed.bit_length(), 1) + 8) // 8, "big", signed=True)
        elif isinstance(seed, str):
            seed_bytes = seed.encode("utf-8")
        else:
            seed_bytes = bytes(seed)
        self._seed = seed_bytes
        key = hashlib.sha256(b"edgefl-deterministic-random\x00" + seed_bytes).digest()
        cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None)
        self._encryptor = cipher.encryptor()

    @property
    def secure(self) -> bool:
        """Always False: the stream is predictable from the seed."""
        return False

    def random_bytes(self, n: int) -> bytes:
        """Return the next ``n`` bytes of the keystream."""
        if n < 0:
            raise ValueError(f"byte count must be >= 0, got {n}")
        return self._encryptor.update(b"\x00" * n)

    def __repr__(self) -> str:
        return f"DeterministicRandom(seed={self._seed!r})"


_DEFAULT = SystemRandom()


def default_random() -> RandomSource:
    """Return the production randomness source (the OS CSPRNG)."""
    return _DEFAULT


def uniform_uint64(source: RandomSource, n: int) -> npt.NDArray[np.uint64]:
    """Return ``n`` independent uniform 64-bit unsigned integers from ``source``."""
    return np.frombuffer(source.random_bytes(8 * n), dtype="<u8").astype(np.uint64, copy=False)


def randbelow(source: RandomSource, bound: int) -> int:
    """Return a uniform integer in ``[0, bound)`` by rejection (no modulo bias)."""
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    bits = bound.bit_length()
    nbytes = (bits + 7) // 8
    mask = (1 << bits) - 1
    while True:
        candidate = int.from_bytes(source.random_bytes(nbytes), "big") & mask
        if candidate < bound:
            return candidate
