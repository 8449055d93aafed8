"""Threshold Paillier costs: safe primes, the dealer ceremony, one holder's share, verify, combine.

Run: ``edgefl bench committee_math [--quick] --json FILE``.

* ``safe_prime_1024_s``: mean (and max) seconds of :func:`generate_safe_prime`
  at 1024 bits (the size of each prime of a 2048-bit modulus).
* ``ceremony_2048_s``: a whole 2048-bit 3-of-5 ceremony (two safe primes, shares,
  verification keys).
* ``share_s`` / ``share_2w_s``: one holder's decryption share plus batch
  proof for ``ciphertexts`` ciphertexts, in this process / on 2 workers.
* ``verify_s``: checking one share's proof; ``combine_s``: combining T shares.

``*_cpu_s`` is this process's CPU time for the same step: on a shared machine
it moves less than wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run(quick: bool) -> dict[str, Any]:
    from aggregator.threshold import (
        ceremony,
        combine,
        decryption_share,
        generate_safe_prime,
        make_context,
        verify_share,
    )
    from edge_sdk.crypto import encrypt

    primes = 2 if quick else 12
    walls, cpus = [], []
    for _ in range(primes):
        _, wall, cpu = _timed(lambda: generate_safe_prime(1024))
        walls.append(wall)
        cpus.append(cpu)
    cer, ceremony_s, ceremony_cpu = _timed(lambda: ceremony(2048, holders=5, threshold=3))
    count = 64 if quick else 641
    cts = list(encrypt(cer.public_key, list(range(count))))
    context = make_context("bench", 1, b"\x00" * 32)
    first, share_s, share_cpu = _timed(
        lambda: decryption_share(cer.shares[0], cts, context=context)
    )
    second, share_2w_s, _ = _timed(
        lambda: decryption_share(cer.shares[1], cts, context=context, workers=2)
    )
    third = decryption_share(cer.shares[2], cts, context=context, workers=2)
    _, verify_s, verify_cpu = _timed(
        lambda: verify_share(cer.committee, cts, first, context=context)
    )
    plain, combine_s, combine_cpu = _timed(
        lambda: combine(cer.committee, count, [first, second, third])
    )
    assert plain == list(range(count))
    return {
        "safe_prime_1024_s": round(sum(walls) / primes, 3),
        "safe_prime_1024_cpu_s": round(sum(cpus) / primes, 3),
        "safe_prime_1024_max_cpu_s": round(max(cpus), 3),
        "safe_prime_runs": primes,
        "ceremony_2048_s": round(ceremony_s, 3),
        "ceremony_2048_cpu_s": round(ceremony_cpu, 3),
        "ciphertexts": count,
        "share_s": round(share_s, 3),
        "share_cpu_s": round(share_cpu, 3),
        "share_2w_s": round(share_2w_s, 3),
        "verify_s": round(verify_s, 3),
        "verify_cpu_s": round(verify_cpu, 3),
        "combine_s": round(combine_s, 3),
        "combine_cpu_s": round(combine_cpu, 3),
        "share_bytes": len(first.to_bytes(cer.committee)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (or write) its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    text = json.dumps(run(args.quick), indent=2) + "\n"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
