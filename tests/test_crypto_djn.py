"""DJN obfuscators: base validation, fixed-base table, persistence, pool, decryption, KATs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from edge_sdk.crypto import (
    ObfuscatorPool,
    PackingSpec,
    PaillierPrivateKey,
    PaillierPublicKey,
    PoolCorruptedError,
    decrypt,
    encrypt,
    pack,
    sum_ciphertexts,
    unpack_sum,
)
from edge_sdk.crypto.djn import (
    DJNBase,
    DJNObfuscatorSource,
    DJNTableError,
    FixedBaseTable,
    default_exponent_bits,
    load_or_build,
)
from edge_sdk.errors import CryptoError, DecodeError
from edge_sdk.randomness import DeterministicRandom

VECTORS = Path(__file__).parent / "vectors"
_KEYS = json.loads((VECTORS / "crypto_test_keys.json").read_text())
P512, Q512 = int(_KEYS["toy512"]["p"]), int(_KEYS["toy512"]["q"])
PK = PaillierPublicKey(n=P512 * Q512)
SK = PaillierPrivateKey(PK, P512, Q512)
BASE = DJNBase.generate(PK, DeterministicRandom("test-djn-base"))
SOURCE = DJNObfuscatorSource(PK, BASE)
P2, Q2 = 4294967279, 4294967291
OTHER_PK = PaillierPublicKey(n=P2 * Q2)
OTHER_BASE = DJNBase.generate(OTHER_PK, DeterministicRandom(1))
KAT = json.loads((VECTORS / "djn_toy.json").read_text())


def hx(value: str) -> int:
    return int(value, 16)


# -- the base ---------------------------------------------------------------------------


def test_generated_base_is_minus_a_square_to_the_n() -> None:
    assert BASE.h is not None
    assert BASE.hs == pow(BASE.h, PK.n, PK.nsquare)
    assert gmpy2.jacobi(PK.n - BASE.h, P512) == 1  # -h = x^2 is a square mod p
    assert BASE.exponent_bits == default_exponent_bits(512) == 256
    assert default_exponent_bits(2048) == 1024 and default_exponent_bits(3072) == 1536
    assert len(BASE.digest) == 64 and BASE.digest == DJNBase(PK.n, BASE.hs, 256).digest
    assert DJNBase(PK.n, BASE.hs, 256) == BASE  # publishing h or not: the same base


@pytest.mark.parametrize(
    ("hs", "bits", "match"),
    [
        (1, 256, "1 < hs"),
        (0, 256, "1 < hs"),
        (P512 * Q512 * P512 * Q512, 256, "1 < hs"),
        (P512 * 5, 256, "unit"),
        (12345, 255, "exponent_bits"),
        (12345, 1025, "exponent_bits"),
    ],
)
def test_invalid_bases_are_refused(hs: int, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DJNBase(n=PK.n, hs=hs, exponent_bits=bits)


def test_a_wrong_h_is_refused() -> None:
    assert BASE.h is not None
    with pytest.raises(ValueError, match="h\\^n"):
        DJNBase(n=PK.n, hs=BASE.hs, exponent_bits=256, h=BASE.h + 1)


def test_json_round_trip_and_tampering() -> None:
    again = DJNBase.from_json(BASE.to_json())
    assert again == BASE and again.digest == BASE.digest
    data = json.loads(BASE.to_json())
    data["hs"] = format(BASE.hs + 1, "x")
    data.pop("h")
    with pytest.raises(DecodeError, match="digest"):
        DJNBase.from_dict(data)
    for broken in ('{"format": "x"}', "[]", "not json"):
        with pytest.raises(DecodeError):
            DJNBase.from_json(broken)
    extra = json.loads(BASE.to_json()) | {"surprise": 1}
    with pytest.raises(DecodeError, match="fields"):
        DJNBase.from_dict(extra)


def test_a_base_for_another_key_is_refused() -> None:
    with pytest.raises(CryptoError, match="another public key"):
        DJNObfuscatorSource(OTHER_PK, BASE)
    with pytest.raises(CryptoError):
        BASE.check_key(OTHER_PK)


# -- the fixed-base table ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**700), st.sampled_from([1, 3, 6]))
def test_table_pow_equals_powmod(exponent: int, window: int) -> None:
    table = FixedBaseTable(BASE.hs, PK.nsquare, max_bits=300, window=window)
    assert table.pow(exponent) == pow(BASE.hs, exponent, PK.nsquare)


def test_table_memory_is_stated() -> None:
    table = SOURCE.table
    rows = -(-table.max_bits // table.window)
    assert table.entries == rows * 63
    assert table.nbytes == table.entries * PK.ciphertext_bytes
    with pytest.raises(ValueError):
        table.pow(-1)


def test_obfuscators_are_hs_to_their_exponent() -> None:
    rng = DeterministicRandom(3)
    for obf, a in SOURCE.draw_many(5, rng):
        assert 0 <= a < 2**256
        assert obf == pow(BASE.hs, a, PK.nsquare)


# -- ordinary Paillier ciphertexts -------------------------------------------------------


def test_djn_ciphertexts_decrypt_with_phe_and_the_project() -> None:
    plaintexts = [0, 1, 42, PK.n - 1]
    vec, exps = SOURCE.encrypt(plaintexts, DeterministicRandom(9))
    phe_pk = paillier.PaillierPublicKey(PK.n)
    phe_sk = paillier.PaillierPrivateKey(phe_pk, P512, Q512)
    assert [phe_sk.raw_decrypt(c) for c in vec] == plaintexts
    assert decrypt(SK, vec) == plaintexts
    assert len(exps) == 4


def test_djn_sums_are_bit_exact_with_the_packing_codec() -> None:
    spec = PackingSpec.derive(PK, max_contributors=10, value_bits=12)
    rng = np.random.default_rng(4)
    updates = [rng.integers(spec.value_min, spec.value_max + 1, 100) for _ in range(4)]
    vectors = [
        SOURCE.encrypt(pack(u, spec), DeterministicRandom(i))[0] for i, u in enumerate(updates)
    ]
    total = sum_ciphertexts(PK, vectors, workers=1)
    got = unpack_sum(decrypt(SK, total), spec, count=4, length=100)
    assert np.array_equal(np.asarray(got), np.sum(updates, axis=0))


def test_encrypt_with_a_djn_pool_decrypts(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK, djn=SOURCE)
    pool.fill(3, rng=DeterministicRandom(2))
    vec = encrypt(PK, [5, 6, 7, 8], pool=pool)
    assert decrypt(SK, vec) == [5, 6, 7, 8]
    assert (pool.taken_from_pool, pool.computed_on_demand) == (3, 1)


# -- table persistence -------------------------------------------------------------------


def test_table_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "hs.tbl"
    SOURCE.table.save(path, public_key=PK, base=BASE)
    loaded = FixedBaseTable.load(path, public_key=PK, base=BASE)
    assert loaded.entries == SOURCE.table.entries and loaded.window == SOURCE.table.window
    for e in (0, 1, 2**256 - 1, 2**900 + 5):
        assert loaded.pow(e) == SOURCE.table.pow(e)


def test_a_table_for_another_key_or_base_is_refused_or_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "hs.tbl"
    other_source = DJNObfuscatorSource(OTHER_PK, OTHER_BASE)
    other_source.table.save(path, public_key=OTHER_PK, base=OTHER_BASE)
    with pytest.raises(DJNTableError, match=r"another|built for key"):
        FixedBaseTable.load(path, public_key=PK, base=BASE)
    same_key_other_base = DJNBase.generate(PK, DeterministicRandom("other"))
    SOURCE.table.save(path, public_key=PK, base=BASE)
    with pytest.raises(DJNTableError, match="base"):
        FixedBaseTable.load(path, public_key=PK, base=same_key_other_base)
    with pytest.raises(CryptoError):
        SOURCE.table.save(path, public_key=PK, base=same_key_other_base)
    # load_or_build never uses the stale file: it rebuilds for the right base.
    rebuilt = load_or_build(path, PK, same_key_other_base)
    assert rebuilt.base == same_key_other_base.hs
    assert FixedBaseTable.load(path, public_key=PK, base=same_key_other_base).base == rebuilt.base
    with pytest.raises(CryptoError):
        DJNObfuscatorSource(PK, BASE, table=rebuilt)


def test_a_corrupt_table_is_refused_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "hs.tbl"
    SOURCE.table.save(path, public_key=PK, base=BASE)
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DJNTableError, match="checksum"):
        FixedBaseTable.load(path, public_key=PK, base=BASE)
    path.write_bytes(bytes(data[:50]))
    with pytest.raises(DJNTableError):
        FixedBaseTable.load(path, public_key=PK, base=BASE)
    table = load_or_build(path, PK, BASE)
    assert table.pow(12345) == pow(BASE.hs, 12345, PK.nsquare)
    assert FixedBaseTable.load(path, public_key=PK, base=BASE).entries == table.entries


def test_source_with_a_table_path_persists(tmp_path: Path) -> None:
    path = tmp_path / "t.tbl"
    base = DJNBase.generate(PK, DeterministicRandom("persist"))
    source = DJNObfuscatorSource(PK, base, table_path=path)
    assert path.is_file() and source.table.base == base.hs
    assert os.stat(path).st_size > source.table.nbytes


# -- the pool ----------------------------------------------------------------------------


def test_djn_pool_keeps_exponents_and_takes_each_once(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK, djn=SOURCE, segment_size=3)
    assert pool.kind == "djn" and pool.directory.parent.name == PK.fingerprint
    pool.fill(7, rng=DeterministicRandom(6))
    expected = SOURCE.draw_many(7, DeterministicRandom(6))
    got = pool.take_many_with_exponents(2)
    got += ObfuscatorPool(tmp_path, PK, djn=SOURCE).take_stored_with_exponents(10)
    assert len(got) == 7
    assert {(int(o), a) for o, a in got} == {(int(o), a) for o, a in expected}
    for obf, a in got:
        assert obf == pow(BASE.hs, a, PK.nsquare)
    assert pool.size() == 0
    fresh = pool.take_many_with_exponents(2, rng=DeterministicRandom(7))
    assert len(fresh) == 2 and pool.computed_on_demand == 2


def test_djn_pool_zeroed_records_are_skipped(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK, djn=SOURCE)
    pool.fill(3, rng=DeterministicRandom(8))
    seg = next(pool.directory.glob("seg-*"))
    record = PK.ciphertext_bytes + 32
    data = bytearray(seg.read_bytes())
    assert (len(data) - 74) == 3 * record
    data[-record:] = bytes(record)
    seg.write_bytes(bytes(data))
    assert len(pool.take_stored_with_exponents(5)) == 2


def test_pools_never_mix_kinds_bases_or_keys(tmp_path: Path) -> None:
    rn = ObfuscatorPool(tmp_path, PK)
    djn = ObfuscatorPool(tmp_path, PK, djn=SOURCE)
    rn.fill(1)
    djn.fill(1)
    rn_seg = next(rn.directory.glob("seg-*"))
    djn_seg = next(djn.directory.glob("seg-*"))
    (rn.directory / "seg-99999999999999999999-x.obf").write_bytes(djn_seg.read_bytes())
    with pytest.raises(PoolCorruptedError, match="mix kinds"):
        rn.take_stored(5)
    (rn.directory / "seg-99999999999999999999-x.obf").unlink()
    (djn.directory / "seg-99999999999999999999-y.obf").write_bytes(rn_seg.read_bytes())
    with pytest.raises(PoolCorruptedError, match="mix kinds"):
        djn.take_stored(5)
    (djn.directory / "seg-99999999999999999999-y.obf").unlink()
    other_base = DJNBase.generate(PK, DeterministicRandom("b2"))
    other = ObfuscatorPool(tmp_path, PK, djn=DJNObfuscatorSource(PK, other_base))
    assert other.directory != djn.directory
    (other.directory / djn_seg.name).write_bytes(djn_seg.read_bytes())
    with pytest.raises(PoolCorruptedError, match="mix bases"):
        other.take_stored(1)
    with pytest.raises(CryptoError, match="different public key"):
        ObfuscatorPool(tmp_path, OTHER_PK, djn=SOURCE)
    with pytest.raises(CryptoError, match="no exponents"):
        rn.take_many_with_exponents(1)
    assert rn.size() == 1 and djn.size() == 1


# -- known answers -----------------------------------------------------------------------


def test_djn_known_answer_vectors() -> None:
    pk = PaillierPublicKey(n=hx(KAT["n"]))
    assert pk.n == PK.n
    base = DJNBase.generate(pk, DeterministicRandom(KAT["base_seed"]))
    assert (base.h, base.hs, base.exponent_bits) == (
        hx(KAT["h"]),
        hx(KAT["hs"]),
        KAT["exponent_bits"],
    )
    assert base.digest == KAT["base_digest"]
    plaintexts = [hx(m) for m in KAT["plaintexts"]]
    exponents = [hx(a) for a in KAT["exponents"]]
    expected = [hx(c) for c in KAT["ciphertexts"]]
    # Independent recomputation with Python's pow: c = (1 + n*m) * hs^a mod n^2.
    nsq = pk.nsquare
    assert [
        (1 + pk.n * m) * pow(base.hs, a, nsq) % nsq
        for m, a in zip(plaintexts, exponents, strict=True)
    ] == (expected)
    vec, exps = DJNObfuscatorSource(pk, base).encrypt(
        plaintexts, DeterministicRandom(KAT["encrypt_seed"])
    )
    assert exps == exponents and list(vec) == expected
    assert decrypt(SK, vec) == plaintexts


_CHILD = """
import json, os, signal, sys
from edge_sdk.crypto import ObfuscatorPool, PaillierPublicKey
from edge_sdk.crypto import pool as pool_module
from edge_sdk.crypto.djn import DJNBase, DJNObfuscatorSource

root, base_json = sys.argv[1], sys.argv[2]
base = DJNBase.from_json(base_json)
pk = PaillierPublicKey(n=base.n)
pool = ObfuscatorPool(root, pk, djn=DJNObfuscatorSource(pk, base))

def hook(values):
    print(json.dumps(values), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

pool_module._after_consume_hook = hook
pool.take_many_with_exponents(3)
print("RETURNED", flush=True)
"""


def test_sigkill_after_a_djn_take_never_reuses_a_pair(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    pool = ObfuscatorPool(tmp_path / "pool", PK, djn=SOURCE)
    pool.fill(8, rng=DeterministicRandom(13))
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pool"), BASE.to_json()],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "RETURNED" not in child.stdout
    consumed = {int(v) for v in json.loads(child.stdout.splitlines()[0])}
    rest = ObfuscatorPool(tmp_path / "pool", PK, djn=SOURCE).take_stored_with_exponents(20)
    assert len(consumed) == 3 and len(rest) == 5
    assert not consumed & {int(o) for o, _ in rest}
    expected = {int(o) for o, _ in SOURCE.draw_many(8, DeterministicRandom(13))}
    assert consumed | {int(o) for o, _ in rest} == expected
