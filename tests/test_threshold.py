"""Threshold Paillier: ceremony, decryption shares with batch proofs, combination, share files.

Real arithmetic on small keys (``allow_insecure_size=True``), plus
known-answer vectors on a toy key (p = 23, q = 59) in
``tests/vectors/threshold_toy.json``. Regenerate those with
``python tests/test_threshold.py`` (only after a deliberate format change).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gmpy2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phe import paillier

from aggregator.threshold import (
    MAX_HOLDERS,
    Ceremony,
    CommitteePublic,
    DecryptionShare,
    HolderShare,
    InsufficientSharesError,
    InvalidShareError,
    ThresholdError,
    _prove,
    ceremony,
    combine,
    combine_robust,
    decryption_share,
    generate_safe_prime,
    lagrange_coefficients,
    load_share,
    make_context,
    save_share,
    verify_share,
)
from edge_sdk.crypto import (
    encrypt,
    generate_keypair,
    load_private_key,
    save_private_key,
    sum_ciphertexts,
)
from edge_sdk.errors import CryptoError, DecodeError, InvalidCiphertextError, KeyFileError
from edge_sdk.randomness import DeterministicRandom, randbelow

VECTORS = Path(__file__).parent / "vectors" / "threshold_toy.json"
CTX = make_context("clinic", 7, b"\x11" * 32)
OTHER_CTX = make_context("clinic", 8, b"\x11" * 32)


def _safe_primes(bits: int, seed: str) -> tuple[int, int]:
    rng = DeterministicRandom(seed)
    p = generate_safe_prime(bits, rng)
    q = generate_safe_prime(bits, rng)
    while q == p:
        q = generate_safe_prime(bits, rng)
    return p, q


@pytest.fixture(scope="module")
def primes256() -> tuple[int, int]:
    return _safe_primes(256, "threshold-test-primes")


@pytest.fixture(scope="module")
def c23(primes256: tuple[int, int]) -> Ceremony:
    return ceremony(
        512,
        holders=3,
        threshold=2,
        primes=primes256,
        allow_insecure_size=True,
        rng=DeterministicRandom("c23"),
    )


@pytest.fixture(scope="module")
def c35(primes256: tuple[int, int]) -> Ceremony:
    return ceremony(
        512,
        holders=5,
        threshold=3,
        primes=primes256,
        allow_insecure_size=True,
        rng=DeterministicRandom("c35"),
    )


def _cts(cer: Ceremony, plaintexts: Sequence[int], seed: str = "enc") -> list[int]:
    return list(encrypt(cer.public_key, list(plaintexts), rng=DeterministicRandom(seed)))


def _shares(cer: Ceremony, cts: Sequence[int], ctx: bytes = CTX) -> list[DecryptionShare]:
    return [
        decryption_share(s, cts, context=ctx, rng=DeterministicRandom(f"proof-{s.index}"))
        for s in cer.shares
    ]


# ----------------------------------------------------------------------------- safe primes


@pytest.mark.parametrize("bits", [8, 12, 16, 64, 128, 256])
def test_safe_prime_has_exact_size_and_is_safe(bits: int) -> None:
    for k in range(3):
        p = generate_safe_prime(bits, DeterministicRandom(f"sp-{bits}-{k}"))
        assert p.bit_length() == bits and p >> (bits - 2) == 3
        assert gmpy2.is_prime(p, 50) and gmpy2.is_prime((p - 1) // 2, 50)


def test_safe_prime_is_reproducible_from_the_rng_and_random_otherwise() -> None:
    a = generate_safe_prime(128, DeterministicRandom(5))
    assert a == generate_safe_prime(128, DeterministicRandom(5))
    assert generate_safe_prime(128) != generate_safe_prime(128)


@pytest.mark.parametrize("bits", [7, 0, -3, 9000])
def test_safe_prime_rejects_bad_sizes(bits: int) -> None:
    with pytest.raises(ValueError):
        generate_safe_prime(bits)


# ----------------------------------------------------------------------------- ceremony


def test_ceremony_shapes(c35: Ceremony) -> None:
    com = c35.committee
    assert c35.public_key.n == com.n and c35.public_key.bits == 512
    assert (com.threshold, com.holders, com.delta) == (3, 5, 120)
    assert [s.index for s in c35.shares] == [1, 2, 3, 4, 5]
    assert len(com.verification_keys) == 5
    assert "secret" not in repr(c35.shares[0]) or "<hidden>" in repr(c35.shares[0])
    assert str(c35.shares[0].secret) not in repr(c35.shares[0]) + repr(c35)


def test_ceremony_generates_its_own_primes() -> None:
    cer = ceremony(256, holders=3, threshold=2, allow_insecure_size=True)
    assert cer.public_key.bits == 256
    cts = _cts(cer, [0, 1, 12345])
    assert combine(cer.committee, 3, _shares(cer, cts)[:2]) == [0, 1, 12345]


@pytest.mark.parametrize(
    ("holders", "threshold", "match"),
    [
        (3, 4, "threshold"),
        (3, 0, "threshold"),
        (0, 1, "holders"),
        (MAX_HOLDERS + 1, 2, "holders"),
    ],
)
def test_ceremony_validates_counts(holders: int, threshold: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ceremony(
            11, holders=holders, threshold=threshold, primes=(23, 59), allow_insecure_size=True
        )


def test_ceremony_refuses_small_keys_without_the_flag() -> None:
    with pytest.raises(ValueError, match="insecure"):
        ceremony(1024, holders=3, threshold=2)
    with pytest.raises(ValueError, match="insecure"):
        ceremony(11, holders=3, threshold=2, primes=(23, 59))


@pytest.mark.parametrize(
    ("primes", "bits", "match"),
    [
        ((29, 59), 11, "safe prime"),  # 29 is prime but 14 is not
        ((21, 59), 11, "safe prime"),
        ((23, 23), 9, "distinct"),
        ((23, 59), 12, "bits"),
        ((7, 59), 9, "exceed holders"),  # p' = 3 <= holders
    ],
)
def test_ceremony_validates_given_primes(primes: tuple[int, int], bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ceremony(bits, holders=5, threshold=3, primes=primes, allow_insecure_size=True)


def test_verification_base_generates_the_squares() -> None:
    # With toy primes a random square often has a small order; the dealer redraws.
    p, q = 23, 59
    n, nm = p * q, p * q * 11 * 29
    for seed in range(20):
        com = ceremony(
            11,
            holders=3,
            threshold=2,
            primes=(p, q),
            allow_insecure_size=True,
            rng=DeterministicRandom(seed),
        ).committee
        for ell in (p, q, 11, 29):
            assert pow(com.v, nm // ell, n * n) != 1


# ----------------------------------------------------------------------------- committee


def test_committee_json_round_trip_and_fingerprint(c35: Ceremony) -> None:
    com = c35.committee
    text = com.to_json()
    back = CommitteePublic.from_json(text, min_bits=256)
    assert back == com and back.fingerprint == com.fingerprint
    assert len(com.fingerprint) == 64 and int(com.fingerprint, 16) >= 0
    with pytest.raises(ValueError, match="'n' has 512 bits"):
        CommitteePublic.from_json(text)  # 2048-bit minimum by default


def _edit(doc: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(doc))
    if value is _DROP:
        del out[field]
    else:
        out[field] = value
    return out


_DROP = object()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("format", "edgefl-paillier-public-key", "format"),
        ("version", 2, "version"),
        ("n", _DROP, "'n'"),
        ("n", "xyz", "'n'"),
        ("n", "0f", "'n'"),
        ("n", 12, "'n'"),
        ("threshold", 0, "'threshold'"),
        ("threshold", "2", "'threshold'"),
        ("threshold", True, "'threshold'"),
        ("holders", 6, "'verification_keys'|'delta'"),
        ("delta", "79", "'delta'"),
        ("v", "1", "'v'"),
        ("v", "0", "'v'"),
        ("verification_keys", [], "'verification_keys'"),
        ("verification_keys", "abc", "'verification_keys'"),
        ("fingerprint", "00" * 32, "'fingerprint'"),
        ("bits", 511, "'bits'"),
        ("public_key_fingerprint", "00", "'public_key_fingerprint'"),
    ],
)
def test_committee_from_json_names_the_bad_field(
    c35: Ceremony, field: str, value: Any, match: str
) -> None:
    doc = _edit(c35.committee.to_dict(), field, value)
    with pytest.raises(ValueError, match=match):
        CommitteePublic.from_dict(doc, min_bits=256)


def test_committee_rejects_a_verification_key_out_of_range(c35: Ceremony) -> None:
    com = c35.committee
    nsq = com.nsquare
    for bad in (0, 1, nsq, nsq + 5, com.n * 3):
        keys = (*com.verification_keys[:2], bad, *com.verification_keys[3:])
        with pytest.raises(ValueError, match=r"'verification_keys'\[2\]"):
            replace(com, verification_keys=keys)
    with pytest.raises(ValueError, match="not valid JSON"):
        CommitteePublic.from_json("{")


def test_committee_fingerprint_covers_every_field(c35: Ceremony, c23: Ceremony) -> None:
    com = c35.committee
    assert com.fingerprint != c23.committee.fingerprint
    swapped = replace(
        com,
        verification_keys=(
            com.verification_keys[1],
            com.verification_keys[0],
            *com.verification_keys[2:],
        ),
    )
    assert swapped.fingerprint != com.fingerprint
    assert replace(com, threshold=2).fingerprint != com.fingerprint
    assert replace(com, v=com.verification_keys[0]).fingerprint != com.fingerprint


def test_holder_share_checks_its_verification_key(c35: Ceremony) -> None:
    share = c35.shares[1]
    with pytest.raises(ValueError, match="verification key"):
        HolderShare(c35.committee, 3, share.secret)
    with pytest.raises(ValueError, match="verification key"):
        HolderShare(c35.committee, 2, share.secret + 1)
    with pytest.raises(ValueError, match="index"):
        HolderShare(c35.committee, 6, share.secret)
    assert HolderShare(c35.committee, 2, share.secret) == share


# ----------------------------------------------------------------------------- decryption


@pytest.mark.parametrize("which", ["c23", "c35"])
def test_every_t_subset_decrypts_a_homomorphic_sum(
    which: str, request: pytest.FixtureRequest
) -> None:
    cer: Ceremony = request.getfixturevalue(which)
    n = cer.public_key.n
    rows = [[3, 0, n - 1, 10**20], [4, 0, 1, 7], [5, 9, 5, 2**60]]
    vectors = [
        encrypt(cer.public_key, row, rng=DeterministicRandom(i)) for i, row in enumerate(rows)
    ]
    total = list(sum_ciphertexts(cer.public_key, vectors, workers=1))
    expected = [sum(col) % n for col in zip(*rows, strict=True)]
    shares = _shares(cer, total)
    for s in shares:
        verify_share(cer.committee, total, s, context=CTX)
    t = cer.committee.threshold
    for size in range(t, cer.committee.holders + 1):
        for subset in itertools.combinations(shares, size):
            assert combine(cer.committee, len(total), subset) == expected
            for order in itertools.permutations(subset[:t]):
                assert combine(cer.committee, len(total), order) == expected


def test_phe_raw_encryptions_decrypt(c35: Ceremony) -> None:
    pk = paillier.PaillierPublicKey(c35.public_key.n)
    values = [0, 1, 424242, c35.public_key.n - 2]
    cts = [pk.raw_encrypt(v) for v in values]
    # phe's own homomorphic addition of encrypted integers (exponent 0).
    enc_a, enc_b = pk.encrypt(424242), pk.encrypt(-5)
    assert enc_a.exponent == 0 and enc_b.exponent == 0
    summed = [(enc_a + enc_b).ciphertext(), (enc_a + pk.encrypt(8)).ciphertext()]
    shares = _shares(c35, cts + summed)
    expected = [*values, 424237, 424250]
    res = combine_robust(c35.committee, cts + summed, shares, context=CTX)
    assert res.plaintexts == expected and res.used == (1, 2, 3) and not res.rejected


def test_t_minus_one_shares_cannot_decrypt(c35: Ceremony) -> None:
    plain = [123456789, 42]
    cts = _cts(c35, plain)
    shares = _shares(c35, cts)
    with pytest.raises(InsufficientSharesError) as info:
        combine(c35.committee, 2, shares[:2])
    assert info.value.needed == 3 and info.value.accepted == (1, 2)
    with pytest.raises(InsufficientSharesError):
        combine(c35.committee, 2, [shares[0], shares[1], shares[0]])  # duplicates do not count
    # The Lagrange combination of any T - 1 shares does not give the plaintexts.
    com = c35.committee
    n, nsq = com.n, com.nsquare
    inv = pow(4 * com.delta**2, -1, n)
    for subset in itertools.combinations(shares, 2):
        lam = lagrange_coefficients([s.index for s in subset], com.delta)
        for k, m in enumerate(plain):
            acc = 1
            for s in subset:
                acc = acc * pow(s.values[k], 2 * lam[s.index], nsq) % nsq
            assert acc % n != 1 or (acc - 1) // n * inv % n != m


def test_lagrange_coefficients_are_exact_integers() -> None:
    delta = math.factorial(5)
    for size in range(1, 6):
        for subset in itertools.combinations(range(1, 6), size):
            lam = lagrange_coefficients(subset, delta)
            # Interpolating f(x) = 1 + 2x + ... of degree size-1 at 0 gives delta * f(0).
            coeffs = list(range(1, size + 1))
            f = {i: sum(c * i**j for j, c in enumerate(coeffs)) for i in subset}
            assert sum(lam[i] * f[i] for i in subset) == delta * coeffs[0]
    with pytest.raises(ValueError):
        lagrange_coefficients([1, 1], delta)
    with pytest.raises(ValueError):
        lagrange_coefficients([0, 1], delta)


def _values_edited(ds: DecryptionShare, k: int, new: int) -> DecryptionShare:
    values = list(ds.values)
    values[k] = new
    return replace(ds, values=tuple(values))


def test_corrupted_shares_are_named_and_the_others_still_decrypt(c35: Ceremony) -> None:
    plain = [11, 22, 33]
    cts = _cts(c35, plain)
    good = _shares(c35, cts)
    other_vector = _shares(c35, _cts(c35, [11, 22, 34], seed="other"))
    nsq = c35.committee.nsquare
    bad_cases: dict[str, DecryptionShare] = {
        "value": _values_edited(good[0], 1, good[0].values[1] * 2 % nsq),
        "challenge": replace(good[1], challenge=good[1].challenge ^ 1),
        "response": replace(good[2], response=good[2].response + 1),
        "context": decryption_share(c35.shares[3], cts, context=OTHER_CTX),
        "vector": other_vector[4],
    }
    for name, bad in bad_cases.items():
        with pytest.raises(InvalidShareError) as info:
            verify_share(c35.committee, cts, bad, context=CTX)
        assert info.value.index == bad.index and info.value.reason == "proof", name
        assert f"holder {bad.index}" in str(info.value)
    # Two bad holders out of five: the three others still decrypt.
    mixed = [bad_cases["value"], bad_cases["challenge"], good[2], good[3], good[4]]
    res = combine_robust(c35.committee, cts, mixed, context=CTX)
    assert res.plaintexts == plain and res.used == (3, 4, 5)
    assert [(e.index, e.reason) for e in res.rejected] == [(1, "proof"), (2, "proof")]
    # Three bad: not enough left, and the error names who was bad.
    mixed[2] = bad_cases["response"]
    with pytest.raises(InsufficientSharesError) as info2:
        combine_robust(c35.committee, cts, mixed, context=CTX)
    assert [e.index for e in info2.value.rejected] == [1, 2, 3]
    assert "holder 1: proof" in str(info2.value) and "holder 3: proof" in str(info2.value)
    # combine on an unverified wrong share fails loudly instead of returning garbage.
    with pytest.raises(ThresholdError):
        combine(c35.committee, 3, [bad_cases["value"], good[1], good[2]])


def test_structural_faults_are_named(c35: Ceremony) -> None:
    cts = _cts(c35, [1, 2])
    ds = _shares(c35, cts)[0]
    com = c35.committee
    cases = [
        (replace(ds, index=0), "index"),
        (replace(ds, index=6), "index"),
        (replace(ds, values=ds.values[:1]), "count"),
        (_values_edited(ds, 0, 0), "range"),
        (_values_edited(ds, 0, com.nsquare), "range"),
        (_values_edited(ds, 1, com.n), "not_unit"),
        (replace(ds, challenge=1 << 128), "proof"),
        (replace(ds, response=-1), "proof"),
        (replace(ds, index=2), "proof"),  # holder 1's share claiming to be holder 2
    ]
    for bad, reason in cases:
        with pytest.raises(InvalidShareError) as info:
            verify_share(com, cts, bad, context=CTX)
        assert info.value.reason == reason, (bad.index, reason)
    res = combine_robust(com, cts, [ds, replace(ds, index=2), *_shares(c35, cts)[1:]], context=CTX)
    assert res.plaintexts == [1, 2]
    assert [(e.index, e.reason) for e in res.rejected] == [(2, "proof")]


def test_duplicates_in_combine_robust(c35: Ceremony) -> None:
    cts = _cts(c35, [5])
    shares = _shares(c35, cts)
    again = decryption_share(c35.shares[0], cts, context=CTX)  # same holder, fresh proof
    res = combine_robust(
        com := c35.committee, cts, [shares[0], shares[0], again, *shares[1:3]], context=CTX
    )
    assert res.plaintexts == [5] and res.used == (1, 2, 3)
    assert [(e.index, e.reason) for e in res.rejected] == [(1, "duplicate")]
    assert com.threshold == 3


def test_wrong_exponent_fails_even_with_an_honest_looking_proof(c35: Ceremony) -> None:
    cts = _cts(c35, [77, 78])
    share = c35.shares[2]
    nsq = c35.committee.nsquare
    # A holder that uses s_i + 1 (computes and proves with the wrong exponent).
    wrong = HolderShare.__new__(HolderShare)
    for name, value in (("committee", c35.committee), ("index", 3), ("secret", share.secret + 1)):
        object.__setattr__(wrong, name, value)
    cheat = decryption_share(wrong, cts, context=CTX)
    with pytest.raises(InvalidShareError, match="proof"):
        verify_share(c35.committee, cts, cheat, context=CTX)
    # Right exponent on all but one ciphertext, proof made with the real secret.
    x = 2 * c35.committee.delta * share.secret
    values = [pow(c, x, nsq) for c in cts]
    values[1] = pow(cts[1], x + 2, nsq)
    forged = _prove(share, cts, values, CTX, DeterministicRandom(1))
    with pytest.raises(InvalidShareError, match="proof"):
        verify_share(c35.committee, cts, forged, context=CTX)


def test_sign_flips_pass_the_proof_and_combine_cancels_them(c35: Ceremony) -> None:
    # The proof works on squares: c_ik * (-1) passes (the statement is about c_ik^2);
    # combine raises to 2 * lambda_i, so an order-2 error cannot change the result.
    cts = _cts(c35, [1000, 2000])
    share = c35.shares[0]
    nsq = c35.committee.nsquare
    x = 2 * c35.committee.delta * share.secret
    values = [pow(c, x, nsq) for c in cts]
    values[0] = nsq - values[0]
    flipped = _prove(share, cts, values, CTX, DeterministicRandom(2))
    verify_share(c35.committee, cts, flipped, context=CTX)
    others = _shares(c35, cts)[1:3]
    assert combine(c35.committee, 2, [flipped, *others]) == [1000, 2000]


def test_proof_replayed_under_another_context_fails(
    c23: Ceremony, primes256: tuple[int, int]
) -> None:
    cts = _cts(c23, [9])
    ds = decryption_share(c23.shares[0], cts, context=CTX)
    verify_share(c23.committee, cts, ds, context=CTX)
    for ctx in (OTHER_CTX, make_context("other", 7, b"\x11" * 32), make_context("clinic", 7, b"")):
        with pytest.raises(InvalidShareError, match="proof"):
            verify_share(c23.committee, cts, ds, context=ctx)
    # ... and under another committee with the same modulus.
    other = ceremony(
        512,
        holders=3,
        threshold=2,
        primes=primes256,
        allow_insecure_size=True,
        rng=DeterministicRandom("x"),
    )
    with pytest.raises(InvalidShareError):
        verify_share(other.committee, cts, ds, context=CTX)


def test_inputs_are_validated(c23: Ceremony) -> None:
    share = c23.shares[0]
    n = c23.public_key.n
    with pytest.raises(ValueError, match="context"):
        decryption_share(share, [2], context=b"")
    with pytest.raises(TypeError):
        decryption_share(share, [2], context="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decryption_share(share, [], context=CTX)
    for bad, reason in ((0, "range"), (n, "not_unit"), (n * n, "range"), (n * n + 1, "range")):
        with pytest.raises(InvalidCiphertextError) as info:
            decryption_share(share, [2, bad], context=CTX)
        assert info.value.reason == reason and "ciphertext 1" in str(info.value)
    ds = decryption_share(share, [2], context=CTX)
    with pytest.raises(InvalidCiphertextError):
        verify_share(c23.committee, [n], ds, context=CTX)
    with pytest.raises(InvalidShareError, match="count"):
        combine(c23.committee, 2, [ds, ds])
    assert isinstance(InvalidShareError(1, "proof"), CryptoError)


def test_parallel_share_equals_sequential(c23: Ceremony) -> None:
    cts = _cts(c23, list(range(40)))
    one = decryption_share(c23.shares[1], cts, context=CTX, rng=DeterministicRandom(3))
    two = decryption_share(c23.shares[1], cts, context=CTX, rng=DeterministicRandom(3), workers=2)
    assert one == two


# ----------------------------------------------------------------------------- wire format


def test_share_bytes_round_trip_and_every_prefix_is_rejected(c35: Ceremony) -> None:
    com = c35.committee
    cts = _cts(c35, [1, 2, 3])
    ds = _shares(c35, cts)[3]
    blob = ds.to_bytes(com)
    assert len(blob) == 7 + 16 + com.response_bytes + 3 * com.ciphertext_bytes
    assert blob[0] == 1
    back = DecryptionShare.from_bytes(blob, com, count=3)
    assert back == ds
    verify_share(com, cts, back, context=CTX)
    for cut in range(len(blob)):
        with pytest.raises(DecodeError):
            DecryptionShare.from_bytes(blob[:cut], com)
    with pytest.raises(DecodeError, match="bytes"):
        DecryptionShare.from_bytes(blob + b"\x00", com)
    with pytest.raises(DecodeError, match="version"):
        DecryptionShare.from_bytes(b"\x02" + blob[1:], com)
    with pytest.raises(DecodeError, match="index"):
        DecryptionShare.from_bytes(blob[:1] + b"\x00\x06" + blob[3:], com)
    with pytest.raises(DecodeError, match="index"):
        DecryptionShare.from_bytes(blob[:1] + b"\x00\x00" + blob[3:], com)
    with pytest.raises(DecodeError, match="expected 2"):
        DecryptionShare.from_bytes(blob, com, count=2)
    width = com.ciphertext_bytes
    zeroed = blob[:-width] + b"\x00" * width
    with pytest.raises(DecodeError, match="value 2"):
        DecryptionShare.from_bytes(zeroed, com)
    too_big = blob[:-width] + com.nsquare.to_bytes(width, "big")
    with pytest.raises(DecodeError, match="value 2"):
        DecryptionShare.from_bytes(too_big, com)
    with pytest.raises(ValueError):
        replace(ds, response=1 << (8 * com.response_bytes)).to_bytes(com)


# ----------------------------------------------------------------------------- share files


def test_share_file_round_trip(tmp_path: Path, c35: Ceremony) -> None:
    share = c35.shares[2]
    path = save_share(share, tmp_path / "h3.json", passphrase="pw", scrypt_n=2**4)
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert format(share.secret, "x") not in text and '"edgefl-threshold-share"' in text
    back = load_share(
        path,
        passphrase="pw",
        expected_committee_fingerprint=c35.committee.fingerprint,
        min_bits=256,
    )
    assert back == share and back.committee == c35.committee
    with pytest.raises(KeyFileError, match="exists"):
        save_share(share, path, passphrase="pw", scrypt_n=2**4)
    save_share(share, path, passphrase=b"pw2", scrypt_n=2**4, overwrite=True)
    assert load_share(path, passphrase=b"pw2", min_bits=256) == share


def test_share_file_failures(tmp_path: Path, c35: Ceremony, c23: Ceremony) -> None:
    share = c35.shares[0]
    path = save_share(share, tmp_path / "h1.json", passphrase="pw", scrypt_n=2**4)
    with pytest.raises(KeyFileError, match="wrong passphrase") as info:
        load_share(path, passphrase="nope", min_bits=256)
    assert info.value.reason == "key_file_passphrase"
    with pytest.raises(KeyFileError, match="no passphrase"):
        load_share(path, passphrase=None, min_bits=256)
    with pytest.raises(KeyFileError, match="expected"):
        load_share(
            path,
            passphrase="pw",
            expected_committee_fingerprint=c23.committee.fingerprint,
            min_bits=256,
        )
    with pytest.raises(KeyFileError, match="bits"):
        load_share(path, passphrase="pw")  # 2048-bit minimum by default
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_share(path, passphrase="pw", min_bits=256)
    os.chmod(path, 0o600)
    # The header is authenticated: moving the sealed secret to another index fails.
    doc = json.loads(path.read_text())
    doc["index"] = 2
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    os.chmod(tampered, 0o600)
    with pytest.raises(KeyFileError, match="wrong passphrase or tampered"):
        load_share(tampered, passphrase="pw", min_bits=256)
    doc = json.loads(path.read_text())
    doc["committee"]["threshold"] = 2
    tampered.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="committee"):
        load_share(tampered, passphrase="pw", min_bits=256)


def test_share_file_unencrypted_needs_opt_in(tmp_path: Path, c35: Ceremony) -> None:
    share = c35.shares[4]
    with pytest.raises(ValueError):
        save_share(share, tmp_path / "x.json", passphrase=None)
    with pytest.raises(ValueError):
        save_share(share, tmp_path / "x.json", passphrase="pw", insecure_unencrypted=True)
    with pytest.raises(ValueError):
        save_share(share, tmp_path / "x.json", passphrase="")
    path = save_share(share, tmp_path / "x.json", passphrase=None, insecure_unencrypted=True)
    with pytest.raises(KeyFileError, match="UNENCRYPTED"):
        load_share(path, passphrase=None, min_bits=256)
    assert load_share(path, passphrase=None, allow_unencrypted=True, min_bits=256) == share


def test_share_files_and_secret_key_files_are_never_confused(tmp_path: Path, c35: Ceremony) -> None:
    share_path = save_share(c35.shares[0], tmp_path / "share.json", passphrase="pw", scrypt_n=2**4)
    with pytest.raises(KeyFileError, match="not a version-1 edgefl secret key file"):
        load_private_key(share_path, passphrase="pw", min_bits=256)
    _, sk = generate_keypair(512, allow_insecure_size=True)
    key_path = save_private_key(sk, tmp_path / "sk.json", passphrase="pw", scrypt_n=2**4)
    with pytest.raises(KeyFileError, match="not a version-1 edgefl threshold share file"):
        load_share(key_path, passphrase="pw", min_bits=256)


# ----------------------------------------------------------------------------- vectors


def _toy_vectors() -> dict[str, Any]:
    p, q, holders, threshold = 23, 59, 5, 3
    seed = "edgefl-threshold-toy-v1"
    n, m = p * q, 11 * 29
    nsq, nm = n * n, n * m
    cer = ceremony(
        n.bit_length(),
        holders=holders,
        threshold=threshold,
        primes=(p, q),
        allow_insecure_size=True,
        rng=DeterministicRandom(seed),
    )
    replay = DeterministicRandom(seed)  # ceremony's documented draw order
    coefficients = [m * pow(m, -1, n)] + [randbelow(replay, nm) for _ in range(threshold - 1)]
    plaintexts = [0, 1, 2, 1000, n - 1]
    randoms = [2, 3, 5, 1000, n - 2]
    cts = [(1 + n * x) * pow(r, n, nsq) % nsq for x, r in zip(plaintexts, randoms, strict=True)]
    context = make_context("toy", 1, bytes(range(8)))
    dshares = [
        decryption_share(
            s, cts, context=context, rng=DeterministicRandom(f"{seed}/proof/{s.index}")
        )
        for s in cer.shares
    ]
    com = cer.committee
    return {
        "description": "threshold Paillier toy key; regenerate: python tests/test_threshold.py",
        "p": p,
        "q": q,
        "holders": holders,
        "threshold": threshold,
        "ceremony_seed": seed,
        "n": n,
        "m": m,
        "coefficients": coefficients,
        "shares": [s.secret for s in cer.shares],
        "delta": com.delta,
        "v": com.v,
        "verification_keys": list(com.verification_keys),
        "committee_fingerprint": com.fingerprint,
        "committee_json": com.to_dict(),
        "context_hex": context.hex(),
        "plaintexts": plaintexts,
        "obfuscator_randoms": randoms,
        "ciphertexts": cts,
        "decryption_shares": [
            {
                "index": d.index,
                "proof_seed": f"{seed}/proof/{d.index}",
                "values": list(d.values),
                "challenge": d.challenge,
                "response": d.response,
                "bytes_hex": d.to_bytes(com).hex(),
            }
            for d in dshares
        ],
    }


def test_known_answer_vectors() -> None:
    vec = json.loads(VECTORS.read_text())
    assert vec == _toy_vectors()  # the code reproduces every value
    # ... and the values satisfy the scheme's equations, computed here independently.
    p, q, n, m = vec["p"], vec["q"], vec["n"], vec["m"]
    nsq, nm, delta = n * n, n * m, vec["delta"]
    assert n == p * q and m == (p - 1) // 2 * (q - 1) // 2 and delta == 120
    d = vec["coefficients"][0]
    assert d % m == 0 and d % n == 1 and 0 <= d < nm
    for i, s in enumerate(vec["shares"], start=1):
        assert s == sum(a * i**j for j, a in enumerate(vec["coefficients"])) % nm
        assert vec["verification_keys"][i - 1] == pow(vec["v"], delta * s, nsq)
    for x, r, c in zip(
        vec["plaintexts"], vec["obfuscator_randoms"], vec["ciphertexts"], strict=True
    ):
        assert c == (1 + n * x) * pow(r, n, nsq) % nsq
    com = CommitteePublic.from_dict(vec["committee_json"], min_bits=8)
    assert com.fingerprint == vec["committee_fingerprint"]
    context = bytes.fromhex(vec["context_hex"])
    dshares = []
    for entry in vec["decryption_shares"]:
        s = vec["shares"][entry["index"] - 1]
        assert entry["values"] == [pow(c, 2 * delta * s, nsq) for c in vec["ciphertexts"]]
        ds = DecryptionShare.from_bytes(bytes.fromhex(entry["bytes_hex"]), com)
        assert list(ds.values) == entry["values"] and ds.challenge == entry["challenge"]
        verify_share(com, vec["ciphertexts"], ds, context=context)
        dshares.append(ds)
    inv = pow(4 * delta * delta, -1, n)
    for subset in itertools.combinations(dshares, 3):
        assert combine(com, len(vec["ciphertexts"]), subset) == vec["plaintexts"]
        lam = lagrange_coefficients([s.index for s in subset], delta)
        for k, x in enumerate(vec["plaintexts"]):
            acc = 1
            for s in subset:
                acc = acc * pow(s.values[k], 2 * lam[s.index], nsq) % nsq
            assert (acc - 1) // n * inv % n == x


# ----------------------------------------------------------------------------- properties


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_property_any_t_subset_decrypts(c35: Ceremony, data: st.DataObject) -> None:
    n = c35.public_key.n
    plain = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4))
    seed = data.draw(st.integers(0, 2**32))
    cts = list(encrypt(c35.public_key, plain, rng=DeterministicRandom(seed)))
    indices = data.draw(st.permutations(range(5)))[:3]
    shares = [
        decryption_share(c35.shares[i], cts, context=CTX, rng=DeterministicRandom(seed + i))
        for i in indices
    ]
    for s in shares:
        verify_share(c35.committee, cts, s, context=CTX)
    assert combine(c35.committee, len(cts), shares) == plain


@pytest.mark.slow
def test_2048_bit_ceremony_decrypts() -> None:
    cer = ceremony(2048, holders=3, threshold=2)
    assert cer.public_key.bits == 2048
    cts = list(encrypt(cer.public_key, [1, 2**100, 3]))
    shares = [decryption_share(s, cts, context=CTX) for s in cer.shares[1:]]
    res = combine_robust(cer.committee, cts, shares, context=CTX)
    assert res.plaintexts == [1, 2**100, 3] and res.used == (2, 3)
    assert CommitteePublic.from_json(cer.committee.to_json()) == cer.committee


if __name__ == "__main__":  # regenerate the known-answer vectors
    VECTORS.write_text(json.dumps(_toy_vectors(), indent=1) + "\n")
    sys.stdout.write(f"wrote {VECTORS}\n")
