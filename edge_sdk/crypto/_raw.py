"""Raw Paillier parts. DANGEROUS: for the library's own use, tests and benchmarks.

Why these are dangerous:

* :func:`raw_encrypt` takes the obfuscator ``r^n`` as an argument and keeps no
  record of it. Using one obfuscator for two ciphertexts lets anyone divide
  them and learn ``(1 + n*(m1 - m2))``, i.e. the difference of the plaintexts;
  anyone who learns an obfuscator decrypts its ciphertext. Use
  :func:`edge_sdk.crypto.encrypt`, which draws fresh obfuscators or consumes a
  pool durably.
* :func:`pack_unsigned` writes slot values without range checks, so it can
  build exactly the out-of-range plaintexts a malicious device would send
  (tests use it to show the key holder's overflow check).
"""

from __future__ import annotations

from typing import Any

import gmpy2
import numpy as np
import numpy.typing as npt

from edge_sdk.crypto.keys import PaillierPublicKey
from edge_sdk.crypto.packing import PackingSpec, _pack_unsigned
from edge_sdk.randomness import RandomSource, default_random, randbelow

__all__ = [
    "compute_obfuscator",
    "obfuscators_from_randoms",
    "pack_unsigned",
    "random_unit",
    "raw_encrypt",
]


def random_unit(public_key: PaillierPublicKey, rng: RandomSource | None = None) -> int:
    """Return a uniform ``r`` in ``[1, n)`` with ``gcd(r, n) = 1``."""
    source = default_random() if rng is None else rng
    n = public_key._n
    while True:
        r = randbelow(source, public_key.n - 1) + 1
        if gmpy2.gcd(r, n) == 1:
            return r


def compute_obfuscator(public_key: PaillierPublicKey, r: int) -> Any:
    """Return ``r^n mod n^2`` as a gmpy2 ``mpz`` (the whole cost of encryption)."""
    return gmpy2.powmod(gmpy2.mpz(r), public_key._n, public_key._nsq)


def _powmod_chunk(args: tuple[int, int, list[int]]) -> list[int]:
    n, nsq, rs = args
    mn, mnsq = gmpy2.mpz(n), gmpy2.mpz(nsq)
    return [int(gmpy2.powmod(gmpy2.mpz(r), mn, mnsq)) for r in rs]


def obfuscators_from_randoms(
    public_key: PaillierPublicKey, randoms: list[int], *, workers: int | None = None
) -> list[Any]:
    """Compute ``r^n mod n^2`` for many ``r``, optionally in worker processes.

    gmpy2 holds the GIL during ``powmod`` (measured), so parallel speed-up
    needs processes, not threads.
    """
    if workers is None or workers <= 1 or len(randoms) < 2 * max(workers or 1, 1):
        return [compute_obfuscator(public_key, r) for r in randoms]
    from edge_sdk.crypto._parallel import process_executor

    size = -(-len(randoms) // workers)
    chunks = [randoms[i : i + size] for i in range(0, len(randoms), size)]
    with process_executor(workers) as pool:
        results = pool.map(
            _powmod_chunk, [(public_key.n, public_key.nsquare, chunk) for chunk in chunks]
        )
        return [gmpy2.mpz(x) for part in results for x in part]


def raw_encrypt(public_key: PaillierPublicKey, m: int, obfuscator: Any) -> Any:
    """Return ``(1 + n*m) * obfuscator mod n^2``; no checks, no bookkeeping."""
    n, nsq = public_key._n, public_key._nsq
    return (n * m + 1) * obfuscator % nsq


def pack_unsigned(unsigned: npt.ArrayLike, spec: PackingSpec) -> list[int]:
    """Pack slot values ``0 <= u < 2^slot_bits`` with no value-range check."""
    arr = np.asarray(unsigned, dtype=np.uint64)
    if arr.size and int(arr.max()) >> spec.slot_bits:
        raise ValueError(f"slot values must be < 2^{spec.slot_bits}")
    return _pack_unsigned(arr, spec)
