"""Multi-exponentiation: ``prod bases[i]^exponents[i] mod m``, the one implementation.

Used by the binding proofs (device and verifier: 64-bit exponents over
thousands of ciphertexts) and by the threshold decryption-share proofs
(128-bit batching exponents). Pippenger's bucket method: for ``N`` bases
with ``b``-bit exponents and a window of ``c`` bits it costs ``b`` squarings
plus about ``ceil(b/c) * (N + 2^(c+1))`` multiplications, instead of the
``N * 1.2 b`` of separate ``powmod`` calls (``edgefl bench crypto`` reports
the measured ratio as ``multi_exp_speedup``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gmpy2

__all__ = ["multi_exp", "naive_multi_exp"]

#: Below this many bases separate powmods are as fast and simpler.
_SMALL = 8


def multi_exp(bases: Sequence[Any], exponents: Sequence[int], modulus: Any) -> Any:
    """Return ``prod bases[i]^exponents[i] mod modulus`` (an ``mpz``).

    Raises:
        ValueError: lengths differ or an exponent is negative.
    """
    if len(bases) != len(exponents):
        raise ValueError(f"{len(bases)} bases but {len(exponents)} exponents")
    exps = [int(e) for e in exponents]
    if any(e < 0 for e in exps):
        raise ValueError("exponents must be >= 0")
    m = gmpy2.mpz(modulus)
    bits = max((e.bit_length() for e in exps), default=0)
    if bits == 0:
        return gmpy2.mpz(1) % m
    count = len(exps)
    if count < _SMALL:
        return naive_multi_exp(bases, exps, m)
    mbases = [gmpy2.mpz(b) % m for b in bases]
    window = min(range(1, 17), key=lambda c: -(-bits // c) * (count + (2 << c)) + (1 << c))
    mask = (1 << window) - 1
    result: Any = None
    for w in reversed(range(-(-bits // window))):
        if result is not None:
            for _ in range(window):
                result = result * result % m
        shift = w * window
        buckets: list[Any] = [None] * (mask + 1)
        for base, e in zip(mbases, exps, strict=True):
            digit = (e >> shift) & mask
            if digit:
                held = buckets[digit]
                buckets[digit] = base if held is None else held * base % m
        # sum_d d * bucket[d] with running products: two multiplications per bucket.
        running: Any = None
        total: Any = None
        for digit in range(mask, 0, -1):
            held = buckets[digit]
            if held is not None:
                running = held if running is None else running * held % m
            if running is not None:
                total = running if total is None else total * running % m
        if total is not None:
            result = total if result is None else result * total % m
    return gmpy2.mpz(1) % m if result is None else result


def naive_multi_exp(bases: Sequence[Any], exponents: Sequence[int], modulus: Any) -> Any:
    """Reference: the product of separate ``powmod`` calls (small inputs, tests, benchmarks)."""
    m = gmpy2.mpz(modulus)
    acc = gmpy2.mpz(1) % m
    for b, e in zip(bases, exponents, strict=True):
        acc = acc * gmpy2.powmod(b, e, m) % m
    return acc
