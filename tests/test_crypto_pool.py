"""Obfuscator pool: exactly-once durable consumption, crash safety, key separation."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_sdk.crypto import (
    ObfuscatorPool,
    PaillierPrivateKey,
    PaillierPublicKey,
    PoolCorruptedError,
    _raw,
    decrypt,
    encrypt,
)
from edge_sdk.errors import CryptoError
from edge_sdk.randomness import DeterministicRandom

_KEYS = json.loads((Path(__file__).parent / "vectors" / "crypto_test_keys.json").read_text())
P512, Q512 = int(_KEYS["toy512"]["p"]), int(_KEYS["toy512"]["q"])
PK = PaillierPublicKey(n=P512 * Q512)
SK = PaillierPrivateKey(PK, P512, Q512)
OTHER_PK = PaillierPublicKey(n=4294967279 * 4294967291)
REPO = Path(__file__).resolve().parent.parent


def expected_values(seed: int, count: int) -> set[int]:
    """The obfuscators fill(count, rng=DeterministicRandom(seed)) must store."""
    rng = DeterministicRandom(seed)
    return {int(_raw.compute_obfuscator(PK, _raw.random_unit(PK, rng))) for _ in range(count)}


def drain(pool: ObfuscatorPool) -> list[int]:
    return [int(v) for v in pool.take_stored(pool.size() + 10)]


def test_fill_then_take_returns_each_stored_value_exactly_once(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK, segment_size=4)
    assert pool.fill(10, rng=DeterministicRandom(5)) == 10
    taken = [pool.take() for _ in range(3)] + [int(v) for v in pool.take_many(4)]
    taken += drain(pool)
    assert len(taken) == 10 == len(set(taken))
    assert set(taken) == expected_values(5, 10)
    assert pool.size() == 0
    assert pool.take_stored(3) == []


def test_values_are_valid_obfuscators(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK)
    pool.fill(3)
    for rn in pool.take_many(3):
        c = int(_raw.raw_encrypt(PK, 1234, rn))
        assert SK.raw_decrypt(c) == 1234
        assert 0 < rn < PK.nsquare


def test_a_reopened_pool_never_returns_consumed_values(tmp_path: Path) -> None:
    first = ObfuscatorPool(tmp_path, PK)
    first.fill(6, rng=DeterministicRandom(8))
    a = [int(v) for v in first.take_many(2)]
    second = ObfuscatorPool(tmp_path, PK)
    b = drain(second)
    assert len(b) == 4 and not set(a) & set(b)


def test_empty_pool_computes_fresh_obfuscators(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK)
    pool.fill(2, rng=DeterministicRandom(1))
    got = pool.take_many(5, rng=DeterministicRandom(2))
    assert len(got) == 5 and len({int(v) for v in got}) == 5
    assert pool.size() == 0


def test_encrypt_consumes_the_pool_and_decrypts(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK)
    pool.fill(3)
    plaintexts = [1, 2, 3, 4, 5]
    vec = encrypt(PK, plaintexts, pool=pool)
    assert pool.size() == 0
    assert decrypt(SK, vec) == plaintexts
    with pytest.raises(CryptoError):
        encrypt(PK, [1], pool=ObfuscatorPool(tmp_path, OTHER_PK))


def test_files_are_private_and_keys_live_apart(tmp_path: Path) -> None:
    a = ObfuscatorPool(tmp_path, PK)
    b = ObfuscatorPool(tmp_path, OTHER_PK)
    a.fill(2)
    b.fill(1)
    assert (a.size(), b.size()) == (2, 1)
    assert a.directory != b.directory and a.directory.name == PK.fingerprint
    assert stat.S_IMODE(a.directory.stat().st_mode) == 0o700
    for seg in a.directory.glob("seg-*"):
        assert stat.S_IMODE(seg.stat().st_mode) == 0o600


def test_a_segment_of_another_key_is_refused(tmp_path: Path) -> None:
    a = ObfuscatorPool(tmp_path, PK)
    b = ObfuscatorPool(tmp_path, OTHER_PK)
    b.fill(1)
    seg = next(b.directory.glob("seg-*"))
    (a.directory / seg.name).write_bytes(seg.read_bytes())
    with pytest.raises(PoolCorruptedError, match="mix keys"):
        a.take_stored(1)


def test_zeroed_records_left_by_a_crash_are_skipped(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK)
    pool.fill(3, rng=DeterministicRandom(4))
    seg = next(pool.directory.glob("seg-*"))
    data = bytearray(seg.read_bytes())
    data[-PK.ciphertext_bytes :] = bytes(PK.ciphertext_bytes)  # zeroed, not yet truncated
    seg.write_bytes(bytes(data))
    got = drain(pool)
    assert len(got) == 2 and set(got) < expected_values(4, 3)
    assert pool.size() == 0


def test_a_partial_record_is_reported_as_corruption(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK)
    pool.fill(2)
    seg = next(pool.directory.glob("seg-*"))
    seg.write_bytes(seg.read_bytes()[:-1])
    with pytest.raises(PoolCorruptedError, match="partial"):
        pool.take()


def test_background_fill_reaches_its_target_and_stops(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK)
    filler = pool.start_background_fill(5, batch=2, interval_s=0.01)
    try:
        deadline = time.monotonic() + 60
        while pool.size() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        filler.stop(timeout=30)
    assert not filler.running and filler.error is None
    assert pool.size() == 5


_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from edge_sdk.crypto import ObfuscatorPool, PaillierPublicKey, encrypt
    from edge_sdk.crypto import pool as pool_module

    root, n, mode, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pool = ObfuscatorPool(root, PaillierPublicKey(n=n))
    if mode == "kill":
        def hook(values):
            # Consumption is durable here; die before anything is returned.
            print(json.dumps(values), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        pool_module._after_consume_hook = hook
        encrypt(pool.public_key, [7] * count, pool=pool)
        print("RETURNED", flush=True)
    else:
        got = []
        while True:
            values = pool.take_stored(count)
            if not values:
                break
            got.extend(int(v) for v in values)
        print(json.dumps(got), flush=True)
    """
)


def _run_child(tmp_path: Path, mode: str, count: int) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "pool"), str(PK.n), mode, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_between_consumption_and_return_never_causes_reuse(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path / "pool", PK)
    pool.fill(10, rng=DeterministicRandom(11))
    child = _run_child(tmp_path, "kill", 3)
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    assert "RETURNED" not in out
    consumed = {int(v) for v in json.loads(out.splitlines()[0])}
    assert len(consumed) == 3
    rest = drain(ObfuscatorPool(tmp_path / "pool", PK))
    assert len(rest) == 7
    assert not consumed & set(rest)
    assert consumed | set(rest) == expected_values(11, 10)


def test_concurrent_processes_take_disjoint_values(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path / "pool", PK, segment_size=7)
    pool.fill(40, rng=DeterministicRandom(12))
    children = [_run_child(tmp_path, "drain", 3) for _ in range(2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append([int(v) for v in json.loads(out)])
    a, b = results
    assert len(a) + len(b) == 40
    assert set(a) | set(b) == expected_values(12, 40)
    assert not set(a) & set(b)
