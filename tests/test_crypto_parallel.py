"""Parallel homomorphic sums: same result as one core, no leaked shared memory."""

from __future__ import annotations

from pathlib import Path

from edge_sdk.crypto import CiphertextVector, encrypt, generate_keypair, sum_ciphertexts
from edge_sdk.crypto._parallel import process_executor
from edge_sdk.randomness import DeterministicRandom


def _shm_names() -> set[str]:
    folder = Path("/dev/shm")
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_parallel_sum_equals_single_core_and_cleans_up() -> None:
    pk, _ = generate_keypair(2048)
    rng = DeterministicRandom("parallel")
    vectors = [encrypt(pk, [i, i + 1, 7], rng=rng) for i in range(6)]
    before = _shm_names()
    reference = sum_ciphertexts(pk, vectors, workers=1)
    assert sum_ciphertexts(pk, vectors, workers=2) == reference  # own short-lived pool
    with process_executor(2, prestart=True) as pool:
        assert sum_ciphertexts(pk, vectors, workers=2, executor=pool) == reference
        assert sum_ciphertexts(pk, vectors, workers=1, executor=pool) == reference
    assert _shm_names() - before == set()
    assert isinstance(reference, CiphertextVector) and len(reference) == 3
