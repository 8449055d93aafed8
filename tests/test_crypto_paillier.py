"""Keys, encryption, validation of untrusted ciphertexts, sums, decryption, phe interop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from edge_sdk.crypto import (
    CiphertextAccumulator,
    CiphertextVector,
    PackingSpec,
    PaillierPrivateKey,
    PaillierPublicKey,
    _raw,
    decrypt,
    encrypt,
    generate_keypair,
    pack,
    public_key_from_bytes,
    public_key_to_bytes,
    sum_ciphertexts,
    unpack_sum,
)
from edge_sdk.errors import CryptoError, DecodeError, InvalidCiphertextError
from edge_sdk.randomness import DeterministicRandom

_KEYS = json.loads((Path(__file__).parent / "vectors" / "crypto_test_keys.json").read_text())
P512, Q512 = int(_KEYS["toy512"]["p"]), int(_KEYS["toy512"]["q"])
PK = PaillierPublicKey(n=P512 * Q512)
SK = PaillierPrivateKey(PK, P512, Q512)
PHE_SK = paillier.PaillierPrivateKey(paillier.PaillierPublicKey(PK.n), P512, Q512)
OTHER_PK = PaillierPublicKey(n=4294967279 * 4294967291)


def encrypt_ints(values: list[int], spec: PackingSpec, seed: int) -> CiphertextVector:
    return encrypt(PK, pack(np.array(values, dtype=np.int64), spec), rng=DeterministicRandom(seed))


# -- keys -----------------------------------------------------------------------------


def test_generate_keypair_sizes_and_refuses_small_keys() -> None:
    pk, sk = generate_keypair(256, allow_insecure_size=True)
    assert pk.bits == 256 and sk.p * sk.q == pk.n and sk.p != sk.q
    with pytest.raises(ValueError, match="1024"):
        generate_keypair(1024)


def test_generate_default_key_is_2048_bits() -> None:
    pk, sk = generate_keypair()
    assert pk.bits == 2048 and pk.ciphertext_bytes == 512
    assert sk.raw_decrypt(int(_raw.raw_encrypt(pk, 42, _raw.compute_obfuscator(pk, 7)))) == 42


def test_private_key_rejects_wrong_primes() -> None:
    with pytest.raises(ValueError):
        PaillierPrivateKey(PK, P512, Q512 + 2)
    with pytest.raises(ValueError):
        PaillierPublicKey(n=P512 * P512)


def test_public_key_bytes_round_trip_and_rejections() -> None:
    blob = public_key_to_bytes(PK)
    assert public_key_from_bytes(blob, min_bits=512) == PK
    with pytest.raises(DecodeError, match="bits"):
        public_key_from_bytes(blob)  # 512 < default 2048 minimum
    for cut in range(len(blob)):
        with pytest.raises(DecodeError):
            public_key_from_bytes(blob[:cut], min_bits=512)
    with pytest.raises(DecodeError):
        public_key_from_bytes(blob + b"\x00", min_bits=512)
    with pytest.raises(DecodeError, match="version"):
        public_key_from_bytes(b"\x02" + blob[1:], min_bits=512)


def test_fingerprint_depends_only_on_n() -> None:
    assert PaillierPublicKey(n=PK.n).fingerprint == PK.fingerprint
    assert OTHER_PK.fingerprint != PK.fingerprint
    assert len(bytes.fromhex(PK.fingerprint)) == 32


# -- round trips ----------------------------------------------------------------------


@st.composite
def contributions(draw: st.DrawFn) -> tuple[PackingSpec, list[list[int]]]:
    max_c = draw(st.integers(1, 12))
    spec = PackingSpec.derive(PK, max_c, draw(st.integers(2, 24)))
    count = draw(st.integers(1, max_c))
    length = draw(st.integers(1, 2 * spec.slots_per_plaintext + 3))
    vals = st.integers(spec.value_min, spec.value_max)
    return spec, [draw(st.lists(vals, min_size=length, max_size=length)) for _ in range(count)]


@settings(max_examples=40, deadline=None)
@given(contributions(), st.integers(0, 2**32))
def test_decrypt_of_sum_of_encryptions_unpacks_to_exact_sum(
    args: tuple[PackingSpec, list[list[int]]], seed: int
) -> None:
    spec, vectors = args
    cts = [encrypt_ints(v, spec, seed + i) for i, v in enumerate(vectors)]
    total = sum_ciphertexts(PK, cts, workers=1)
    got = unpack_sum(decrypt(SK, total), spec, count=len(vectors), length=len(vectors[0]))
    assert got.tolist() == [sum(col) for col in zip(*vectors, strict=True)]


@settings(max_examples=25, deadline=None)
@given(contributions(), st.integers(0, 2**32))
def test_phe_raw_decrypt_agrees_on_ciphertexts_and_sums(
    args: tuple[PackingSpec, list[list[int]]], seed: int
) -> None:
    spec, vectors = args
    cts = [encrypt_ints(v, spec, seed + i) for i, v in enumerate(vectors)]
    for v, ct in zip(vectors, cts, strict=True):
        assert [PHE_SK.raw_decrypt(c) for c in ct] == pack(np.array(v), spec)
    total = sum_ciphertexts(PK, cts, workers=1)
    assert [PHE_SK.raw_decrypt(c) for c in total] == decrypt(SK, total)


def test_encryption_is_randomised_and_matches_phe_raw_encrypt() -> None:
    m = [5, 0, PK.n - 1]
    a = encrypt(PK, m, rng=DeterministicRandom(1))
    b = encrypt(PK, m, rng=DeterministicRandom(2))
    assert list(a) != list(b)
    assert decrypt(SK, a) == decrypt(SK, b) == m
    phe_pk = paillier.PaillierPublicKey(PK.n)
    r = 123456789
    assert int(_raw.raw_encrypt(PK, 77, _raw.compute_obfuscator(PK, r))) == phe_pk.raw_encrypt(
        77, r_value=r
    )


def test_encrypt_rejects_plaintexts_outside_zero_n() -> None:
    with pytest.raises(ValueError, match="plaintext 1"):
        encrypt(PK, [0, PK.n])
    with pytest.raises(ValueError):
        encrypt(PK, [-1])


# -- serialisation and validation -----------------------------------------------------

SPEC8 = PackingSpec.derive(PK, 4, 8)
VEC = encrypt_ints(list(range(-20, 20)), SPEC8, 99)
BLOB = VEC.to_bytes()


def test_blob_is_fixed_width_and_round_trips() -> None:
    assert len(BLOB) == len(VEC) * PK.ciphertext_bytes
    assert CiphertextVector.from_bytes(BLOB, PK, len(VEC)) == VEC
    assert CiphertextVector.from_bytes(BLOB, PK, len(VEC)).to_bytes() == BLOB


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(BLOB) - 1))
def test_every_truncation_is_rejected(cut: int) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        CiphertextVector.from_bytes(BLOB[:cut], PK, len(VEC))
    assert info.value.reason == "length"


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.booleans())
def test_every_padding_is_rejected(extra: bytes, front: bool) -> None:
    blob = extra + BLOB if front else BLOB + extra
    with pytest.raises(InvalidCiphertextError):
        CiphertextVector.from_bytes(blob, PK, len(VEC))


def _with_element(index: int, value: int) -> bytes:
    width = PK.ciphertext_bytes
    return BLOB[: index * width] + value.to_bytes(width, "big") + BLOB[(index + 1) * width :]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(VEC) - 1), st.integers(0, 256**PK.ciphertext_bytes - 1))
def test_out_of_range_ciphertexts_are_rejected(index: int, junk: int) -> None:
    value = 0 if junk % 3 == 0 else PK.nsquare + junk % (256**PK.ciphertext_bytes - PK.nsquare)
    with pytest.raises(InvalidCiphertextError, match=f"ciphertext {index} ") as info:
        CiphertextVector.from_bytes(_with_element(index, value), PK, len(VEC))
    assert info.value.reason == "range"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(VEC) - 1), st.integers(1, 2**400), st.sampled_from(["p", "q", "n"]))
def test_non_unit_ciphertexts_are_rejected(index: int, k: int, factor: str) -> None:
    base = {"p": P512, "q": Q512, "n": PK.n}[factor]
    value = base * k % PK.nsquare or base
    with pytest.raises(InvalidCiphertextError, match=f"ciphertext {index} ") as info:
        CiphertextVector.from_bytes(_with_element(index, value), PK, len(VEC))
    assert info.value.reason == "not_unit"


def test_constructor_validates_too() -> None:
    with pytest.raises(InvalidCiphertextError):
        CiphertextVector(PK, [1, 0])
    with pytest.raises(TypeError):
        CiphertextVector(PK, [1.5])
    assert list(CiphertextVector(PK, [1, 2])) == [1, 2]


# -- sums -----------------------------------------------------------------------------


def test_accumulator_equals_batch_sum_and_snapshots_are_immutable() -> None:
    spec = PackingSpec.derive(PK, 8, 10)
    vectors = [encrypt_ints([i - 3] * 9, spec, i) for i in range(6)]
    acc = CiphertextAccumulator(PK, len(vectors[0]))
    acc.add(vectors[0])
    first = acc.value
    for v in vectors[1:]:
        acc.add(v)
    assert acc.count == 6
    assert acc.value == sum_ciphertexts(PK, vectors, workers=1)
    assert first == vectors[0]
    resumed = CiphertextAccumulator.from_vector(first, 1)
    for v in vectors[1:]:
        resumed.add(v)
    assert resumed.value == acc.value


def test_accumulator_and_sum_reject_mismatches() -> None:
    other_vec = encrypt(OTHER_PK, [1, 2])
    with pytest.raises(CryptoError):
        CiphertextAccumulator(PK, 2).add(other_vec)
    with pytest.raises(ValueError):
        CiphertextAccumulator(PK, 3).add(encrypt(PK, [1, 2]))
    with pytest.raises(CryptoError):
        sum_ciphertexts(PK, [encrypt(PK, [1, 2]), other_vec])
    with pytest.raises(ValueError):
        sum_ciphertexts(PK, [])
    with pytest.raises(CryptoError):
        decrypt(SK, other_vec)


def test_parallel_sum_equals_serial_sum() -> None:
    spec = PackingSpec.derive(PK, 20, 12)
    vectors = [encrypt_ints([i] * 30, spec, 1000 + i) for i in range(9)]
    serial = sum_ciphertexts(PK, vectors, workers=1)
    parallel = sum_ciphertexts(PK, vectors, workers=2)
    assert parallel == serial
    assert unpack_sum(decrypt(SK, parallel), spec, count=9, length=30).tolist() == [36] * 30


def test_mpz_decoder_fallback_agrees_with_native() -> None:
    from edge_sdk.crypto import _gmp

    blob = BLOB[: PK.ciphertext_bytes]
    assert _gmp._fallback(blob, "big") == _gmp.mpz_from_bytes(blob, "big") == VEC.values[0]
