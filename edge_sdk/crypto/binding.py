"""Binding an update to its sender and round: a batched proof of plaintext knowledge.

Attack stopped. A malicious enrolled device colluding with the aggregator
(who sees every ciphertext) could submit ``Enc(m) * prod c_v^-1`` to cancel
victims out of the sum and isolate one, or submit a copy (or a re-randomised
copy) of another device's ciphertexts under its own identity. Each update
therefore carries a non-interactive zero-knowledge proof that its sender
*knows* the plaintexts ``m_j`` and DJN exponents ``a_j`` of its own
ciphertexts ``c_j = (1 + n)^(m_j) * hs^(a_j) mod n^2``, bound by Fiat-Shamir
to ``(federation, round, device id, packing digest, key fingerprint,
ciphertext digest)``.

Protocol (``H`` = SHA-256 / SHAKE-256 with domain separation):

* coefficients ``t_j``: 64-bit, from ``H(context, ciphertext digest)``;
* ``C* = prod c_j^(t_j)``, ``M* = sum t_j m_j mod n``, ``A* = sum t_j a_j`` (integer);
* prover: ``x`` uniform mod n, ``y`` uniform with ``|y| = eb + 64 + bits(count) + 128 + 80``
  bits (``eb`` = the base's exponent bits; a public bound on ``|A*| + 208``),
  ``A = (1 + n*x) * hs^y``, ``e = H(context, ciphertext digest, A)`` (128 bits),
  ``z1 = x + e*M* mod n``, ``z2 = y + e*A*``;
* verifier: ``(1 + n*z1) * hs^z2 == A * C*^e (mod n^2)``, ``e`` recomputed,
  ``0 <= z1 < n``, ``0 <= z2 < 2^(|y| + 1)``.

Soundness (sketch).

1. *One combination.* From two accepting answers to the same ``A`` with
   challenges ``e != e'`` (rewinding the random oracle at the ``e`` query):
   ``(1+n)^(dz1) * hs^(dz2) = C*^(de)`` with ``0 < |de| < 2^128``. If ``de``
   divides ``dz2`` this gives ``C* = w * (1+n)^(M) * hs^(A)`` with ``M = dz1/de
   mod n`` (``de`` is invertible mod n: its factors are far below p and q) and
   ``w^(de) = 1``. An element of order dividing ``de < p, q`` lies in the
   n-th-residue subgroup, so ``w`` does not change the decryption: the prover
   knows ``Dec(C*)``. If ``de`` does not divide ``dz2``, Shamir's gcd trick
   turns the relation into a non-trivial root of ``hs`` (up to an element
   of small order) and hence (``hs = h^n``, n-th powering is injective) of
   ``h`` modulo n: that breaks the strong RSA assumption for the
   committee's random ``h``.
2. *Every plaintext.* The ``t`` vector is a random-oracle output on the
   device's own ciphertexts and context. Rewinding the oracle at that query
   ``count`` times with fresh answers yields ``count`` combinations whose
   64-bit coefficient matrix ``T`` is invertible mod n except with negligible
   probability (a non-unit determinant would factor n); solving
   ``T * m = M*`` mod n gives every ``m_j = Dec(c_j)``. A fixed, pre-known
   combination would be insecure: with ``t`` known in advance an attacker can
   put ``c_v^(-t2)`` in slot 1 and ``c_v^(t1)`` in slot 2, and the victim's
   contribution cancels inside ``C*``. Because ``t`` hashes the very
   ciphertexts it weighs, any such cancellation ``sum k_j t_j = 0`` (k fixed
   before t is known) holds with probability at most ``2^-64`` per attempt,
   and each attempt (grinding) costs a re-encryption and a hash of the whole
   vector: 64-bit coefficients give 64-bit security against offline grinding.
3. *Why the committee's base.* The statement is "``c_j`` lies in ``<1+n> *
   <hs>`` with known exponents". With a base the device chose, such as a
   victim's ciphertext ``B = c_v``, a copy would "prove" trivially (``m = 0,
   a = 1``). ``hs`` is an n-th residue generated at the key ceremony, before
   and independently of every ciphertext, so no device knows a relation
   between ``hs`` and anyone else's ciphertexts.
4. *Copies and replays.* The context contains the federation, round, device
   id, packing digest, key fingerprint and ciphertext digest, so a proof
   verifies only for the exact ciphertexts, sender and round it was made for;
   a replay in another round or under another id fails the challenge check.
   A fresh proof for a copied vector needs the victim's ``(m_j, a_j)``, and
   so does a re-randomised copy ``c_v * hs^a'`` (representation
   ``(m_v, a_v + a')``). A copy re-randomised with ``r^n`` has no known
   representation over ``hs`` at all. (An exact duplicate under the *same*
   id in the same round is a resubmission; the aggregator keeps one update
   per device per round.)

Zero knowledge (statistical, honest verifier, random oracle): ``z1`` is
``x + e*M*`` for uniform ``x`` mod n, i.e. uniform; ``z2 = y + e*A*`` with
``e*A* < 2^(|y| - 80)``, so ``z2`` is within statistical distance ``2^-80``
of ``y``'s uniform distribution, whose length is a public function of the
count (nothing about ``A*`` leaks through it). The simulator picks ``e, z1,
z2``, sets ``A = (1+n*z1) * hs^z2 * C*^(-e)`` and programs the oracle.

Costs: proving is one fixed-base table exponentiation plus hashing; the
verifier's cost is the multi-exponentiation ``C*`` (Pippenger's bucket
method over 64-bit exponents, :func:`multi_exp`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gmpy2

from edge_sdk.crypto._multiexp import multi_exp
from edge_sdk.crypto.ciphertext import CiphertextVector, _validate
from edge_sdk.crypto.djn import (
    DJNBase,
    DJNObfuscatorSource,
    FixedBaseTable,
    encrypt_with,
    random_exponent,
    table_for,
)
from edge_sdk.crypto.keys import PaillierPublicKey
from edge_sdk.errors import CryptoError, DecodeError
from edge_sdk.randomness import RandomSource, default_random, randbelow

if TYPE_CHECKING:
    from edge_sdk.crypto.pool import ObfuscatorPool

__all__ = [
    "CHALLENGE_BITS",
    "COEFFICIENT_BITS",
    "BindingProof",
    "InvalidBindingError",
    "binding_context",
    "ciphertext_digest",
    "encrypt_bound",
    "prove",
    "verify",
    "verify_bound",
    "verify_many",
]

#: Bits of the Fiat-Shamir challenge ``e`` (soundness error 2^-128 per proof).
CHALLENGE_BITS = 128
#: Bits of each combination coefficient ``t_j`` (grinding costs ~2^64 attempts).
COEFFICIENT_BITS = 64
#: Statistical zero-knowledge slack of ``z2`` (distance 2^-80).
ZK_SLACK_BITS = 80
#: Bits of the private weights of the (not used) weighted batch check.
BATCH_WEIGHT_BITS = 64

_PROOF_VERSION = 1
_CONTEXT_DOMAIN = b"edgefl/binding/context/v1\x00"
_DIGEST_DOMAIN = b"edgefl/binding/ciphertexts/v1\x00"
_COEFF_DOMAIN = b"edgefl/binding/coefficients/v1\x00"
_CHALLENGE_DOMAIN = b"edgefl/binding/challenge/v1\x00"


class InvalidBindingError(CryptoError):
    """A binding proof did not verify (``reason`` says which check failed)."""

    reason = "invalid_binding"


def _n_bytes(public_key: PaillierPublicKey) -> int:
    return (public_key.bits + 7) // 8


def _y_bits(base: DJNBase, count: int) -> int:
    return (
        base.exponent_bits + COEFFICIENT_BITS + count.bit_length() + CHALLENGE_BITS + ZK_SLACK_BITS
    )


@dataclass(frozen=True, slots=True)
class BindingProof:
    """A proof of knowledge of an update's plaintexts and DJN exponents.

    Attributes:
        A: the commitment ``(1 + n*x) * hs^y mod n^2``.
        e: the 128-bit Fiat-Shamir challenge.
        z1: ``x + e*M* mod n``.
        z2: ``y + e*A*`` (a non-negative integer, about 1,300 bits at 2048).
        n_bytes: byte length of ``n`` (fixes the encoding's widths).
    """

    A: int
    e: int
    z1: int
    z2: int
    n_bytes: int

    def to_bytes(self) -> bytes:
        """Fixed-width encoding.

        Layout: u8 version (1), u16 L = byte length of n, A (2L bytes), e (16
        bytes), z1 (L bytes), u16 Z, z2 (Z bytes, minimal: no leading zero
        byte; Z <= 2L). All big-endian.
        """
        length = self.n_bytes
        z2_len = (self.z2.bit_length() + 7) // 8
        return b"".join(
            [
                struct.pack(">BH", _PROOF_VERSION, length),
                self.A.to_bytes(2 * length, "big"),
                self.e.to_bytes(CHALLENGE_BITS // 8, "big"),
                self.z1.to_bytes(length, "big"),
                struct.pack(">H", z2_len),
                self.z2.to_bytes(z2_len, "big"),
            ]
        )

    @classmethod
    def from_bytes(cls, blob: bytes, public_key: PaillierPublicKey) -> BindingProof:
        """Decode an untrusted :meth:`to_bytes` blob for ``public_key``.

        Raises:
            DecodeError: wrong version, widths or total length, ``A`` outside
                ``(0, n^2)``, ``z1 >= n``, or ``z2`` too long or not minimal.
        """
        blob = bytes(blob)
        length = _n_bytes(public_key)
        fixed = 3 + 2 * length + CHALLENGE_BITS // 8 + length + 2
        if len(blob) < 3:
            raise DecodeError(f"binding proof too short ({len(blob)} bytes)")
        version, got_length = struct.unpack(">BH", blob[:3])
        if version != _PROOF_VERSION:
            raise DecodeError(f"unsupported binding proof version {version}")
        if got_length != length:
            raise DecodeError(f"binding proof is for a {got_length}-byte modulus, not {length}")
        if len(blob) < fixed:
            raise DecodeError(f"binding proof too short ({len(blob)} bytes)")
        pos = 3
        a_val = int.from_bytes(blob[pos : pos + 2 * length], "big")
        pos += 2 * length
        e = int.from_bytes(blob[pos : pos + CHALLENGE_BITS // 8], "big")
        pos += CHALLENGE_BITS // 8
        z1 = int.from_bytes(blob[pos : pos + length], "big")
        pos += length
        (z2_len,) = struct.unpack(">H", blob[pos : pos + 2])
        pos += 2
        if z2_len > 2 * length:
            raise DecodeError(f"binding proof z2 is {z2_len} bytes, at most {2 * length} allowed")
        if len(blob) != pos + z2_len:
            raise DecodeError(f"binding proof is {len(blob)} bytes, header says {pos + z2_len}")
        raw_z2 = blob[pos:]
        if raw_z2[:1] == b"\x00":
            raise DecodeError("binding proof z2 has a leading zero byte")
        if not 0 < a_val < public_key.nsquare:
            raise DecodeError("binding proof A is outside (0, n^2)")
        if z1 >= public_key.n:
            raise DecodeError("binding proof z1 is not reduced modulo n")
        return cls(A=a_val, e=e, z1=z1, z2=int.from_bytes(raw_z2, "big"), n_bytes=length)


def binding_context(
    *,
    federation: str,
    round_id: int,
    device_id: str,
    packing_digest: bytes,
    key_fingerprint: str,
    ciphertext_digest: bytes,
) -> bytes:
    """Canonical bytes of what a proof is bound to (domain-separated, length-prefixed).

    Layout: domain, then federation, device id (UTF-8), packing digest, key
    fingerprint (raw 32 bytes), ciphertext digest, each as u32 length + bytes,
    with the round as u64 between federation and device id.
    """
    if isinstance(round_id, bool) or not 0 <= round_id < 1 << 64:
        raise ValueError(f"round_id must be an integer in [0, 2^64), got {round_id!r}")
    fingerprint = bytes.fromhex(key_fingerprint)
    if len(fingerprint) != 32:
        raise ValueError("key_fingerprint must be 64 hex digits")

    def part(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    return b"".join(
        [
            _CONTEXT_DOMAIN,
            part(federation.encode("utf-8")),
            struct.pack(">Q", round_id),
            part(device_id.encode("utf-8")),
            part(bytes(packing_digest)),
            part(fingerprint),
            part(bytes(ciphertext_digest)),
        ]
    )


def _blob(public_key: PaillierPublicKey, ciphertexts: Sequence[int] | CiphertextVector) -> bytes:
    if isinstance(ciphertexts, CiphertextVector):
        return ciphertexts.to_bytes()
    width = public_key.ciphertext_bytes
    return b"".join([int(c).to_bytes(width, "big") for c in ciphertexts])


def ciphertext_digest(
    public_key: PaillierPublicKey, ciphertexts: Sequence[int] | CiphertextVector
) -> bytes:
    """SHA-256 over the domain, key fingerprint, count and the vector's wire blob (32 bytes)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    h.update(bytes.fromhex(public_key.fingerprint))
    h.update(struct.pack(">I", len(ciphertexts)))
    h.update(_blob(public_key, ciphertexts))
    return h.digest()


def _coefficients(context: bytes, digest: bytes, count: int) -> list[int]:
    seed = hashlib.sha256(_COEFF_DOMAIN + struct.pack(">I", len(context)) + context + digest)
    stream = hashlib.shake_256(seed.digest()).digest(8 * count)
    return [int.from_bytes(stream[8 * j : 8 * j + 8], "big") for j in range(count)]


def _challenge(context: bytes, digest: bytes, a_val: int, width: int) -> int:
    h = hashlib.sha256(_CHALLENGE_DOMAIN)
    h.update(struct.pack(">I", len(context)))
    h.update(context)
    h.update(digest)
    h.update(a_val.to_bytes(width, "big"))
    return int.from_bytes(h.digest()[: CHALLENGE_BITS // 8], "big")


def _values(
    public_key: PaillierPublicKey, ciphertexts: Sequence[int] | CiphertextVector
) -> tuple[Any, ...]:
    if isinstance(ciphertexts, CiphertextVector):
        if ciphertexts.public_key != public_key:
            raise CryptoError("ciphertext vector is under a different public key")
        return ciphertexts._values
    values = tuple(gmpy2.mpz(c) for c in ciphertexts)
    _validate(public_key, values)
    return values


def _table(
    public_key: PaillierPublicKey, base: DJNBase, source: DJNObfuscatorSource | None
) -> FixedBaseTable:
    base.check_key(public_key)
    if source is not None:
        if source.base != base or source.public_key != public_key:
            raise CryptoError("the DJN source is for another key or base")
        return source.table
    return table_for(public_key, base)


def prove(
    public_key: PaillierPublicKey,
    base: DJNBase,
    plaintexts: Sequence[int],
    exponents: Sequence[int],
    ciphertexts: Sequence[int] | CiphertextVector,
    *,
    context: bytes,
    rng: RandomSource | None = None,
    source: DJNObfuscatorSource | None = None,
) -> BindingProof:
    """Prove knowledge of ``plaintexts`` and ``exponents`` of ``ciphertexts``.

    Args:
        public_key: the federation's key.
        base: the committee's DJN base the obfuscators were drawn from.
        plaintexts: ``m_j`` in ``[0, n)``.
        exponents: ``a_j`` in ``[0, 2^exponent_bits)`` with ``c_j = (1+n)^m_j * hs^a_j``.
        ciphertexts: the ``c_j`` (ints or a :class:`CiphertextVector`).
        context: :func:`binding_context` bytes.
        rng: randomness for ``x`` and ``y`` (default: the OS CSPRNG).
        source: a DJN source whose table to use (default: the process's cached table).

    Returns:
        The proof.

    Raises:
        ValueError: lengths differ, empty input, or a value out of range.
    """
    count = len(ciphertexts)
    if count == 0 or len(plaintexts) != count or len(exponents) != count:
        raise ValueError(
            f"need as many plaintexts ({len(plaintexts)}) and exponents ({len(exponents)}) "
            f"as ciphertexts ({count}), at least one"
        )
    table = _table(public_key, base, source)
    n, nsq = public_key._n, public_key._nsq
    limit = 1 << base.exponent_bits
    for index, (m, a) in enumerate(zip(plaintexts, exponents, strict=True)):
        if not 0 <= m < public_key.n:
            raise ValueError(f"plaintext {index} is outside [0, n)")
        if not 0 <= a < limit:
            raise ValueError(f"exponent {index} is outside [0, 2^{base.exponent_bits})")
    digest = ciphertext_digest(public_key, ciphertexts)
    return _prove(
        public_key, table, base, plaintexts, exponents, digest, count, context, rng, n, nsq
    )


def _prove(
    public_key: PaillierPublicKey,
    table: FixedBaseTable,
    base: DJNBase,
    plaintexts: Sequence[int],
    exponents: Sequence[int],
    digest: bytes,
    count: int,
    context: bytes,
    rng: RandomSource | None,
    n: Any,
    nsq: Any,
) -> BindingProof:
    source = default_random() if rng is None else rng
    t = _coefficients(context, digest, count)
    m_star = sum(tj * int(m) for tj, m in zip(t, plaintexts, strict=True)) % public_key.n
    a_star = sum(tj * int(a) for tj, a in zip(t, exponents, strict=True))
    x = randbelow(source, public_key.n)
    y = random_exponent(_y_bits(base, count), source)
    a_val = int((n * x + 1) * table.pow(y) % nsq)
    e = _challenge(context, digest, a_val, public_key.ciphertext_bytes)
    return BindingProof(
        A=a_val,
        e=e,
        z1=(x + e * m_star) % public_key.n,
        z2=y + e * a_star,
        n_bytes=_n_bytes(public_key),
    )


def _prepare(
    public_key: PaillierPublicKey,
    base: DJNBase,
    ciphertexts: Sequence[int] | CiphertextVector,
    proof: BindingProof,
    context: bytes,
) -> tuple[Any, list[int]]:
    """Structural and challenge checks; return ``(C*, t)`` for the equation check."""
    values = _values(public_key, ciphertexts)
    count = len(values)
    if count == 0:
        raise InvalidBindingError("no ciphertexts to bind", reason="binding_empty")
    if proof.n_bytes != _n_bytes(public_key):
        raise InvalidBindingError("proof is for another modulus size", reason="binding_format")
    if not 0 < proof.A < public_key.nsquare or gmpy2.gcd(proof.A, public_key._n) != 1:
        raise InvalidBindingError("proof A is not a unit modulo n^2", reason="binding_format")
    if not 0 <= proof.z1 < public_key.n or not 0 <= proof.e < 1 << CHALLENGE_BITS:
        raise InvalidBindingError("proof z1 or e is out of range", reason="binding_format")
    if proof.z2 < 0 or proof.z2.bit_length() > _y_bits(base, count) + 1:
        raise InvalidBindingError("proof z2 is out of range", reason="binding_format")
    digest = ciphertext_digest(public_key, ciphertexts)
    if _challenge(context, digest, proof.A, public_key.ciphertext_bytes) != proof.e:
        raise InvalidBindingError(
            "proof challenge does not match its context and ciphertexts", reason="binding_challenge"
        )
    t = _coefficients(context, digest, count)
    return multi_exp(values, t, public_key._nsq), t


def verify(
    public_key: PaillierPublicKey,
    base: DJNBase,
    ciphertexts: Sequence[int] | CiphertextVector,
    proof: BindingProof,
    *,
    context: bytes,
    source: DJNObfuscatorSource | None = None,
) -> None:
    """Check a binding proof; return nothing on success.

    Args:
        public_key: the federation's key.
        base: the committee's DJN base.
        ciphertexts: the update's ciphertexts (validated when given as ints).
        proof: the proof.
        context: :func:`binding_context` recomputed by the verifier from the
            message's own fields and :func:`ciphertext_digest`.
        source: a DJN source whose table to use (default: the cached table).

    Raises:
        InvalidBindingError: the proof does not verify (``reason``:
            ``binding_format``, ``binding_challenge``, ``binding_equation``).
        InvalidCiphertextError: a ciphertext given as an int is invalid.
    """
    table = _table(public_key, base, source)
    c_star, _ = _prepare(public_key, base, ciphertexts, proof, context)
    nsq, n = public_key._nsq, public_key._n
    lhs = (n * proof.z1 + 1) * table.pow(proof.z2) % nsq
    rhs = proof.A * gmpy2.powmod(c_star, proof.e, nsq) % nsq
    if lhs != rhs:
        raise InvalidBindingError("binding proof equation does not hold", reason="binding_equation")


def verify_many(
    public_key: PaillierPublicKey,
    base: DJNBase,
    items: Sequence[tuple[Sequence[int] | CiphertextVector, BindingProof, bytes]],
    *,
    source: DJNObfuscatorSource | None = None,
) -> list[int]:
    """Verify many devices' proofs; return the indices of the invalid ones (sorted).

    Each item is checked on its own. A weighted batch check (random 64-bit
    weights, one shared ``hs^(sum w z2)`` and one multi-exponentiation of the
    ``A`` and ``C*``) was measured and not kept: it can share only the
    per-device ``hs^z2`` and ``C*^e``, a few percent of the per-device ``C*``
    multi-exponentiation, came out slower in the crypto benchmark, and a
    weighted check is sound only up to factors of small order such as ``-1``.
    (:func:`_verify_many_weighted` keeps it for that benchmark.)

    Args:
        public_key: the federation's key.
        base: the committee's DJN base.
        items: ``(ciphertexts, proof, context)`` per device.
        source: a DJN source whose table to use (default: the cached table).

    Returns:
        Indices of items that failed any check (invalid proof or ciphertexts).
    """
    failed: list[int] = []
    for index, (cts, proof, ctx) in enumerate(items):
        try:
            verify(public_key, base, cts, proof, context=ctx, source=source)
        except CryptoError:
            failed.append(index)
    return failed


def _verify_many_weighted(
    public_key: PaillierPublicKey,
    base: DJNBase,
    items: Sequence[tuple[Sequence[int] | CiphertextVector, BindingProof, bytes]],
    *,
    rng: RandomSource | None = None,
    source: DJNObfuscatorSource | None = None,
) -> list[int]:
    """Benchmark only: the weighted batch check that :func:`verify_many` does not use."""
    table = _table(public_key, base, source)
    weights_source = default_random() if rng is None else rng
    nsq, n = public_key._nsq, public_key._n
    failed: list[int] = []
    prepared: list[tuple[int, BindingProof, Any]] = []
    for index, (cts, proof, ctx) in enumerate(items):
        try:
            c_star, _ = _prepare(public_key, base, cts, proof, ctx)
        except CryptoError:
            failed.append(index)
            continue
        prepared.append((index, proof, c_star))
    if not prepared:
        return failed
    weights = [random_exponent(BATCH_WEIGHT_BITS, weights_source) | 1 for _ in prepared]
    z1_sum = sum(w * p.z1 for w, (_, p, _) in zip(weights, prepared, strict=True)) % public_key.n
    z2_sum = sum(w * p.z2 for w, (_, p, _) in zip(weights, prepared, strict=True))
    lhs = (n * z1_sum + 1) * table.pow(z2_sum) % nsq
    bases: list[Any] = []
    exps: list[int] = []
    for w, (_, p, c_star) in zip(weights, prepared, strict=True):
        bases += [gmpy2.mpz(p.A), c_star]
        exps += [w, w * p.e]
    if lhs == multi_exp(bases, exps, nsq):
        return failed
    for index, proof, c_star in prepared:
        single_lhs = (n * proof.z1 + 1) * table.pow(proof.z2) % nsq
        if single_lhs != proof.A * gmpy2.powmod(c_star, proof.e, nsq) % nsq:
            failed.append(index)
    return sorted(failed)


def encrypt_bound(
    public_key: PaillierPublicKey,
    base: DJNBase,
    plaintexts: Sequence[int],
    *,
    federation: str,
    round_id: int,
    device_id: str,
    packing_digest: bytes,
    pool_or_source: ObfuscatorPool | DJNObfuscatorSource,
    rng: RandomSource | None = None,
) -> tuple[CiphertextVector, BindingProof]:
    """Encrypt packed plaintexts with DJN obfuscators and prove knowledge, in one call.

    Args:
        public_key: the federation's key.
        base: the committee's DJN base.
        plaintexts: packed plaintexts in ``[0, n)``.
        federation: federation name.
        round_id: the round.
        device_id: this device's id.
        packing_digest: :meth:`PackingSpec.digest` of the round's spec.
        pool_or_source: a DJN :class:`ObfuscatorPool` (values consumed durably
            before this returns; a short pool is topped up from its source) or a
            :class:`DJNObfuscatorSource` (fresh values).
        rng: randomness for fresh obfuscators and the proof (default: OS CSPRNG).

    Returns:
        ``(ciphertexts, proof)``; verify with :func:`verify_bound`.

    Raises:
        CryptoError: the pool or source is for another key or base, or is an
            ``r^n`` pool.
        ValueError: a plaintext is outside ``[0, n)`` or there are none.
    """
    if not plaintexts:
        raise ValueError("nothing to encrypt")
    if isinstance(pool_or_source, DJNObfuscatorSource):
        source = pool_or_source
        if source.base != base or source.public_key != public_key:
            raise CryptoError("the DJN source is for another key or base")
        pairs = source.draw_many(len(plaintexts), rng)
    else:
        pool = pool_or_source
        if pool.public_key != public_key:
            raise CryptoError("obfuscator pool belongs to a different public key")
        if pool.djn is None or pool.djn.base != base:
            raise CryptoError("binding needs a DJN pool for this base, not an r^n pool")
        source = pool.djn
        for index, m in enumerate(plaintexts):
            if not 0 <= m < public_key.n:
                raise ValueError(f"plaintext {index} is outside [0, n)")
        pairs = pool.take_many_with_exponents(len(plaintexts), rng=rng)
    vector = encrypt_with(public_key, plaintexts, pairs)
    digest = ciphertext_digest(public_key, vector)
    context = binding_context(
        federation=federation,
        round_id=round_id,
        device_id=device_id,
        packing_digest=packing_digest,
        key_fingerprint=public_key.fingerprint,
        ciphertext_digest=digest,
    )
    proof = _prove(
        public_key,
        source.table,
        base,
        plaintexts,
        [a for _, a in pairs],
        digest,
        len(plaintexts),
        context,
        rng,
        public_key._n,
        public_key._nsq,
    )
    return vector, proof


def verify_bound(
    public_key: PaillierPublicKey,
    base: DJNBase,
    vector: CiphertextVector,
    proof: BindingProof,
    *,
    federation: str,
    round_id: int,
    device_id: str,
    packing_digest: bytes,
) -> None:
    """Verify an :func:`encrypt_bound` update from the message's own fields.

    Raises:
        InvalidBindingError: the proof does not verify for this sender, round
            and ciphertext vector.
    """
    context = binding_context(
        federation=federation,
        round_id=round_id,
        device_id=device_id,
        packing_digest=packing_digest,
        key_fingerprint=public_key.fingerprint,
        ciphertext_digest=ciphertext_digest(public_key, vector),
    )
    verify(public_key, base, vector, proof, context=context)
