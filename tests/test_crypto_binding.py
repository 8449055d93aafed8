"""Binding proofs: honest proofs verify; cancellation, copies, replays and tampering fail."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.crypto import (
    CiphertextVector,
    ObfuscatorPool,
    PaillierPrivateKey,
    PaillierPublicKey,
    decrypt,
)
from edge_sdk.crypto import binding as B
from edge_sdk.crypto.djn import DJNBase, DJNObfuscatorSource, random_exponent
from edge_sdk.errors import CryptoError, DecodeError, InvalidCiphertextError
from edge_sdk.randomness import DeterministicRandom, randbelow

VECTORS = Path(__file__).parent / "vectors"
_KEYS = json.loads((VECTORS / "crypto_test_keys.json").read_text())
P512, Q512 = int(_KEYS["toy512"]["p"]), int(_KEYS["toy512"]["q"])
PK = PaillierPublicKey(n=P512 * Q512)
SK = PaillierPrivateKey(PK, P512, Q512)
BASE = DJNBase.generate(PK, DeterministicRandom("test-binding-base"))
SOURCE = DJNObfuscatorSource(PK, BASE)
NSQ = PK.nsquare
FIELDS = {"federation": "clinic", "round_id": 5, "packing_digest": b"\x07" * 32}
KAT = json.loads((VECTORS / "binding_toy.json").read_text())
DJN_KAT = json.loads((VECTORS / "djn_toy.json").read_text())


def context_for(vector: CiphertextVector | list[int], device_id: str, round_id: int = 5) -> bytes:
    return B.binding_context(
        federation="clinic",
        round_id=round_id,
        device_id=device_id,
        packing_digest=b"\x07" * 32,
        key_fingerprint=PK.fingerprint,
        ciphertext_digest=B.ciphertext_digest(PK, vector),
    )


def honest(
    device_id: str, plaintexts: list[int], seed: int
) -> tuple[CiphertextVector, B.BindingProof]:
    return B.encrypt_bound(
        PK,
        BASE,
        plaintexts,
        device_id=device_id,
        pool_or_source=SOURCE,
        rng=DeterministicRandom(seed),
        **FIELDS,  # type: ignore[arg-type]
    )


VICTIM_M = [11, 22, 33, 44, 55]
VICTIM_VEC, VICTIM_PROOF = honest("victim", VICTIM_M, 1)


def rejected(vector: CiphertextVector | list[int], proof: B.BindingProof, device_id: str) -> str:
    with pytest.raises(B.InvalidBindingError) as info:
        B.verify(PK, BASE, vector, proof, context=context_for(vector, device_id))
    return info.value.reason


# -- honest ------------------------------------------------------------------------------


def test_honest_proofs_verify() -> None:
    B.verify_bound(PK, BASE, VICTIM_VEC, VICTIM_PROOF, device_id="victim", **FIELDS)  # type: ignore[arg-type]
    B.verify(PK, BASE, list(VICTIM_VEC), VICTIM_PROOF, context=context_for(VICTIM_VEC, "victim"))
    assert decrypt(SK, VICTIM_VEC) == VICTIM_M
    single, proof = honest("solo", [PK.n - 1], 2)
    B.verify_bound(PK, BASE, single, proof, device_id="solo", **FIELDS)  # type: ignore[arg-type]


def test_encrypt_bound_with_a_djn_pool(tmp_path: Path) -> None:
    pool = ObfuscatorPool(tmp_path, PK, djn=SOURCE)
    pool.fill(4, rng=DeterministicRandom(3))
    vec, proof = B.encrypt_bound(
        PK,
        BASE,
        [1, 2, 3],
        device_id="d",
        pool_or_source=pool,
        **FIELDS,  # type: ignore[arg-type]
    )
    assert pool.size() == 1 and decrypt(SK, vec) == [1, 2, 3]
    B.verify_bound(PK, BASE, vec, proof, device_id="d", **FIELDS)  # type: ignore[arg-type]
    with pytest.raises(CryptoError, match="r\\^n pool"):
        B.encrypt_bound(
            PK,
            BASE,
            [1],
            device_id="d",
            pool_or_source=ObfuscatorPool(tmp_path, PK),
            **FIELDS,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError):
        B.encrypt_bound(PK, BASE, [PK.n], device_id="d", pool_or_source=pool, **FIELDS)  # type: ignore[arg-type]
    assert pool.size() == 1  # an invalid plaintext consumes nothing


# -- attacks -----------------------------------------------------------------------------


def test_cancellation_against_a_victim_is_refused() -> None:
    # Attacker: c'_0 = Enc(m) * c_v0^-1 (sum would lose the victim's slot 0).
    own_m, own_a = 1000, random_exponent(BASE.exponent_bits, DeterministicRandom(4))
    enc = (1 + PK.n * own_m) * pow(BASE.hs, own_a, NSQ) % NSQ
    forged = [enc * int(gmpy2.invert(VICTIM_VEC.values[0], NSQ)) % NSQ]
    forged += [(1 + PK.n * 7) * pow(BASE.hs, own_a + 1, NSQ) % NSQ]
    # Its best attempt: claim the plaintexts and exponents it knows.
    ctx = context_for(forged, "attacker")
    proof = B.prove(PK, BASE, [own_m, 7], [own_a, own_a + 1], forged, context=ctx)
    assert rejected(forged, proof, "attacker") == "binding_equation"


def test_slot_cancellation_with_known_coefficients_is_refused() -> None:
    # c_v^-t2 in slot 0 and c_v^t1 in slot 1 would cancel for a pre-known (t1, t2);
    # t is derived from the attacker's own ciphertexts, so the guess is wrong.
    cv = VICTIM_VEC.values[0]
    t1, t2 = 3, 5
    forged = [
        int(gmpy2.powmod(gmpy2.invert(cv, NSQ), t2, NSQ)) * pow(BASE.hs, 9, NSQ) % NSQ,
        int(gmpy2.powmod(cv, t1, NSQ)) * pow(BASE.hs, 4, NSQ) % NSQ,
    ]
    ctx = context_for(forged, "attacker")
    proof = B.prove(PK, BASE, [0, 0], [9, 4], forged, context=ctx)
    assert rejected(forged, proof, "attacker") == "binding_equation"


def test_a_copy_under_another_device_id_is_refused() -> None:
    assert rejected(VICTIM_VEC, VICTIM_PROOF, "attacker") == "binding_challenge"


def test_a_rerandomised_copy_is_refused() -> None:
    extra = [random_exponent(64, DeterministicRandom(i)) for i in range(len(VICTIM_VEC))]
    copy = [c * pow(BASE.hs, a, NSQ) % NSQ for c, a in zip(VICTIM_VEC, extra, strict=True)]
    assert decrypt(SK, CiphertextVector(PK, copy)) == VICTIM_M
    assert rejected(copy, VICTIM_PROOF, "attacker") == "binding_challenge"
    # Knowing only the re-randomisation, the attacker proves with guesses: refused.
    ctx = context_for(copy, "attacker")
    proof = B.prove(PK, BASE, [0] * 5, extra, copy, context=ctx)
    assert rejected(copy, proof, "attacker") == "binding_equation"


def test_a_proof_replayed_in_another_round_is_refused() -> None:
    ctx = context_for(VICTIM_VEC, "victim", round_id=6)
    with pytest.raises(B.InvalidBindingError):
        B.verify(PK, BASE, VICTIM_VEC, VICTIM_PROOF, context=ctx)


def test_one_changed_ciphertext_is_refused() -> None:
    changed = list(VICTIM_VEC)
    changed[2] = changed[2] * pow(BASE.hs, 1, NSQ) % NSQ
    assert rejected(changed, VICTIM_PROOF, "victim") == "binding_challenge"
    # Even with the proof's challenge recomputed honestly by the verifier's rules.
    assert rejected(changed[:4], VICTIM_PROOF, "victim") in {"binding_challenge", "binding_format"}


@pytest.mark.parametrize(
    ("field", "delta"),
    [("z1", 1), ("z2", 1), ("A", 1), ("e", 1), ("z2", -1), ("z1", -1)],
)
def test_tampered_proofs_are_refused(field: str, delta: int) -> None:
    tampered = dataclasses.replace(VICTIM_PROOF, **{field: getattr(VICTIM_PROOF, field) + delta})
    with pytest.raises(B.InvalidBindingError):
        B.verify(PK, BASE, VICTIM_VEC, tampered, context=context_for(VICTIM_VEC, "victim"))


def test_out_of_range_proof_values_are_refused() -> None:
    ctx = context_for(VICTIM_VEC, "victim")
    for change in ({"z1": PK.n}, {"A": 0}, {"A": P512}, {"z2": 1 << 2000}, {"n_bytes": 3}):
        bad = dataclasses.replace(VICTIM_PROOF, **change)
        with pytest.raises(B.InvalidBindingError, match=r"range|unit|modulus"):
            B.verify(PK, BASE, VICTIM_VEC, bad, context=ctx)
    with pytest.raises(InvalidCiphertextError):
        B.verify(PK, BASE, [0, *list(VICTIM_VEC)[1:]], VICTIM_PROOF, context=ctx)


def test_prove_refuses_bad_witnesses() -> None:
    ctx = context_for(VICTIM_VEC, "victim")
    with pytest.raises(ValueError, match="exponent"):
        B.prove(PK, BASE, VICTIM_M, [1 << BASE.exponent_bits] * 5, VICTIM_VEC, context=ctx)
    with pytest.raises(ValueError, match="plaintext"):
        B.prove(PK, BASE, [PK.n] * 5, [0] * 5, VICTIM_VEC, context=ctx)
    with pytest.raises(ValueError, match="as many"):
        B.prove(PK, BASE, VICTIM_M[:4], [0] * 5, VICTIM_VEC, context=ctx)


def test_context_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        B.binding_context(
            federation="f",
            round_id=-1,
            device_id="d",
            packing_digest=b"",
            key_fingerprint=PK.fingerprint,
            ciphertext_digest=b"",
        )
    with pytest.raises(ValueError):
        B.binding_context(
            federation="f",
            round_id=1,
            device_id="d",
            packing_digest=b"",
            key_fingerprint="ab",
            ciphertext_digest=b"",
        )


# -- encoding ----------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, PK.nsquare - 1),
    st.integers(0, 2**128 - 1),
    st.integers(0, PK.n - 1),
    st.integers(0, 2**1000),
)
def test_proof_bytes_round_trip(a: int, e: int, z1: int, z2: int) -> None:
    proof = B.BindingProof(A=a, e=e, z1=z1, z2=z2, n_bytes=64)
    blob = proof.to_bytes()
    assert B.BindingProof.from_bytes(blob, PK) == proof
    for cut in range(0, len(blob), 7):
        with pytest.raises(DecodeError):
            B.BindingProof.from_bytes(blob[:cut], PK)


def test_every_strict_prefix_and_bad_encodings_are_rejected() -> None:
    blob = VICTIM_PROOF.to_bytes()
    assert B.BindingProof.from_bytes(blob, PK) == VICTIM_PROOF
    for cut in range(len(blob)):
        with pytest.raises(DecodeError):
            B.BindingProof.from_bytes(blob[:cut], PK)
    with pytest.raises(DecodeError):
        B.BindingProof.from_bytes(blob + b"\x00", PK)
    with pytest.raises(DecodeError, match="version"):
        B.BindingProof.from_bytes(b"\x02" + blob[1:], PK)
    with pytest.raises(DecodeError, match="modulus"):
        B.BindingProof.from_bytes(blob, PaillierPublicKey(n=4294967279 * 4294967291))
    head = 3 + 128 + 16 + 64
    z2 = blob[head + 2 :]
    padded = blob[:head] + struct.pack(">H", len(z2) + 1) + b"\x00" + z2
    with pytest.raises(DecodeError, match="leading zero"):
        B.BindingProof.from_bytes(padded, PK)
    big_a = blob[:3] + PK.nsquare.to_bytes(128, "big") + blob[131:]
    with pytest.raises(DecodeError, match="A"):
        B.BindingProof.from_bytes(big_a, PK)


# -- multi-exponentiation and batch verification ----------------------------------------


@pytest.mark.parametrize("batch", [False, True])
def test_verify_many_names_the_invalid_proofs(batch: bool) -> None:
    def check(items: list[tuple[CiphertextVector, B.BindingProof, bytes]], seed: int) -> list[int]:
        if batch:
            return B._verify_many_weighted(PK, BASE, items, rng=DeterministicRandom(seed))
        return B.verify_many(PK, BASE, items)

    items = []
    for i in range(4):
        vec, proof = honest(f"dev-{i}", [i, i + 1, i + 2], 10 + i)
        items.append((vec, proof, context_for(vec, f"dev-{i}")))
    assert check(items, 1) == []
    bad_z = dataclasses.replace(items[1][1], z2=items[1][1].z2 + 1)
    items[1] = (items[1][0], bad_z, items[1][2])
    items[3] = (items[3][0], items[3][1], context_for(items[3][0], "someone-else"))
    assert check(items, 2) == [1, 3]


# -- known answers -----------------------------------------------------------------------


def test_binding_known_answer_vectors() -> None:
    base = DJNBase(n=PK.n, hs=int(DJN_KAT["hs"], 16), exponent_bits=DJN_KAT["exponent_bits"])
    plaintexts = [int(m, 16) for m in DJN_KAT["plaintexts"]]
    exponents = [int(a, 16) for a in DJN_KAT["exponents"]]
    cts = [int(c, 16) for c in DJN_KAT["ciphertexts"]]
    width = PK.ciphertext_bytes
    # Ciphertext digest and context by the documented layouts.
    digest = hashlib.sha256(
        b"edgefl/binding/ciphertexts/v1\x00"
        + bytes.fromhex(PK.fingerprint)
        + struct.pack(">I", len(cts))
        + b"".join(c.to_bytes(width, "big") for c in cts)
    ).digest()
    assert digest.hex() == KAT["ciphertext_digest"] == B.ciphertext_digest(PK, cts).hex()

    def part(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    ctx = (
        b"edgefl/binding/context/v1\x00"
        + part(b"clinic")
        + struct.pack(">Q", 7)
        + part(b"pi-17")
        + part(bytes(range(32)))
        + part(bytes.fromhex(PK.fingerprint))
        + part(digest)
    )
    assert ctx.hex() == KAT["context"]
    seed = hashlib.sha256(
        b"edgefl/binding/coefficients/v1\x00" + struct.pack(">I", len(ctx)) + ctx + digest
    ).digest()
    stream = hashlib.shake_256(seed).digest(8 * len(cts))
    t = [int.from_bytes(stream[8 * j : 8 * j + 8], "big") for j in range(len(cts))]
    assert [format(x, "x") for x in t] == KAT["coefficients"]
    # Prover's randomness through the rng seam: x = randbelow(n), then y (|y| bits).
    rng = DeterministicRandom(KAT["prove_seed"])
    x = randbelow(rng, PK.n)
    y_bits = base.exponent_bits + 64 + len(cts).bit_length() + 128 + 80
    y = int.from_bytes(rng.random_bytes((y_bits + 7) // 8), "big") & ((1 << y_bits) - 1)
    a_val = (1 + PK.n * x) * pow(base.hs, y, NSQ) % NSQ
    e = int.from_bytes(
        hashlib.sha256(
            b"edgefl/binding/challenge/v1\x00"
            + struct.pack(">I", len(ctx))
            + ctx
            + digest
            + a_val.to_bytes(width, "big")
        ).digest()[:16],
        "big",
    )
    m_star = sum(tj * m for tj, m in zip(t, plaintexts, strict=True)) % PK.n
    a_star = sum(tj * a for tj, a in zip(t, exponents, strict=True))
    z1, z2 = (x + e * m_star) % PK.n, y + e * a_star
    assert [format(v, "x") for v in (a_val, e, z1, z2)] == [KAT[k] for k in ("A", "e", "z1", "z2")]
    # The library produces the same proof and bytes, and the equation holds.
    proof = B.prove(
        PK,
        base,
        plaintexts,
        exponents,
        cts,
        context=ctx,
        rng=DeterministicRandom(KAT["prove_seed"]),
    )
    assert (proof.A, proof.e, proof.z1, proof.z2) == (a_val, e, z1, z2)
    assert proof.to_bytes().hex() == KAT["proof"]
    c_star = 1
    for c, tj in zip(cts, t, strict=True):
        c_star = c_star * pow(c, tj, NSQ) % NSQ
    assert (1 + PK.n * z1) * pow(base.hs, z2, NSQ) % NSQ == a_val * pow(c_star, e, NSQ) % NSQ
    B.verify(PK, base, cts, B.BindingProof.from_bytes(bytes.fromhex(KAT["proof"]), PK), context=ctx)
