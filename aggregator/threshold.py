"""Threshold Paillier (Shoup / Damgard-Jurik with s = 1): T of N holders decrypt together.

The public key stays an ordinary Paillier key with ``g = n + 1``
(:class:`edge_sdk.crypto.keys.PaillierPublicKey`), so devices, packing, the
obfuscator pool and phe interop are unchanged. Only the key holder changes:
instead of one secret key, N holders each keep a Shamir share of
``d`` (``d = 0 mod m``, ``d = 1 mod n``); any T of them produce *decryption
shares* of a ciphertext vector with a zero-knowledge proof that they used
their real share, and anyone combines T verified shares into the plaintexts.
Fewer than T holders learn nothing about ``d`` (and so nothing about any
plaintext).

This module is pure math: no network I/O. Randomness comes from an injected
:class:`edge_sdk.randomness.RandomSource` (default: the OS CSPRNG); all big
arithmetic uses gmpy2.

Key set-up (trusted dealer, Shoup 2000 / Damgard-Jurik 2001)
-------------------------------------------------------------
``n = p*q`` with safe primes ``p = 2p' + 1``, ``q = 2q' + 1``; ``m = p'q'``;
``d = m * (m^-1 mod n)``; a random polynomial ``f`` of degree ``T - 1`` over
``Z_{n*m}`` with ``f(0) = d``; holder ``i`` (1..N) gets ``s_i = f(i)``.
``Delta = N!``. ``v`` is a random square generating the group of squares
``Q`` of ``Z*_{n^2}`` (order ``n*m``, cyclic, every prime factor of its order
is one of p, q, p', q'); the verification keys are ``v_i = v^(Delta*s_i)``.

The dealer (:func:`ceremony`) knows p, q and d while it runs: it must be a
trusted, short-lived, offline process that writes the sealed share files and
exits. Nothing here keeps p, q, m or d after :func:`ceremony` returns (the
locals are deleted; Python cannot wipe the integers' memory, which is one more
reason to run the dealer as its own short-lived process).

Dealer-free key generation is NOT implemented. The one packaged option for
Python is TNO's ``tno.mpc.protocols.distributed-keygen`` (4.3.0, 2024-12,
Apache-2.0): a pure-Python ``py3-none-any`` wheel (so it installs on aarch64
and x86-64 alike) implementing Veugen, Attema and Spini, "An implementation
of the Paillier crypto system with threshold decryption without a trusted
dealer" (a semi-honest simplification of Nishide-Sakurai: shared random
primes, a distributed Boneh-Franklin biprimality test, secret sharing over the
integers). It is secure only against semi-honest parties: its code has no
zero-knowledge proofs at all (a holder can send a wrong decryption share
undetected); its modulus is not a product of safe primes (so the share proofs
below do not apply to it); it is asyncio code on its own communication pool
(``tno.mpc.communication``, HTTP) rather than our transport; its pins lag its
own sibling packages (``tno.mpc.communication~=4.8`` and
``tno.mpc.encryption_schemes.paillier~=3.0`` while 5.x and 4.x are current).
Its speed was not measured here: it searches for the modulus by trial
(shared random candidates until one passes the distributed biprimality test,
one network round trip per step), which is inherently far slower than a
dealer's local safe-prime search. Adopting it, or a maliciously secure DKG,
would be a separate design decision; the dealer ceremony is the supported
set-up.

Decryption shares and their proof
---------------------------------
For ciphertexts ``c_1..c_K`` holder ``i`` publishes ``c_{i,k} = c_k^(2*Delta*s_i)``
and one proof for the whole batch (see :func:`decryption_share`). Any T
verified shares with index set S combine (:func:`combine`) as
``c'_k = prod_{i in S} c_{i,k}^(2*lambda_i) = c_k^(4*Delta^2*d)`` with the
integer Lagrange coefficients ``lambda_i = Delta * prod_{j != i} j / (j - i)``,
and ``m_k = L(c'_k) * (4*Delta^2)^-1 mod n`` with ``L(u) = (u - 1) / n``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np
import numpy.typing as npt

from edge_sdk.crypto._multiexp import multi_exp
from edge_sdk.crypto.keyfile import (
    _SCRYPT_DEFAULT,
    _atomic_write,
    _check_permissions,
    _read_json,
    _seal_payload,
    _unseal_payload,
)
from edge_sdk.crypto.keys import MAX_KEY_BITS, MIN_KEY_BITS, PaillierPublicKey
from edge_sdk.errors import CryptoError, DecodeError, InvalidCiphertextError, KeyFileError
from edge_sdk.randomness import RandomSource, default_random, randbelow

__all__ = [
    "MAX_HOLDERS",
    "SHARE_FILE_FORMAT",
    "Ceremony",
    "CombineResult",
    "CommitteePublic",
    "DecryptionShare",
    "HolderShare",
    "InsufficientSharesError",
    "InvalidShareError",
    "ThresholdError",
    "ceremony",
    "combine",
    "combine_robust",
    "decryption_share",
    "generate_safe_prime",
    "lagrange_coefficients",
    "load_share",
    "make_context",
    "save_share",
    "verify_share",
]

#: Largest committee accepted (Delta = N! grows the exponents by log2(N!) bits).
MAX_HOLDERS = 64
#: ``format`` of a sealed share file (never mistaken for a whole secret key file).
SHARE_FILE_FORMAT = "edgefl-threshold-share"
#: ``format`` of a committee's public JSON.
COMMITTEE_FORMAT = "edgefl-threshold-committee"

#: Statistical / soundness security parameter in bits (challenge and batching width).
SECURITY_BITS = 128
#: Miller-Rabin rounds for p' and p (on top of GMP's own BPSW-style checks).
PRIME_ROUNDS = 40

_COMMITTEE_DOMAIN = b"edgefl/threshold-committee/v1\x00"
_RHO_DOMAIN = b"edgefl/threshold/batch-coefficients/v1\x00"
_CHALLENGE_DOMAIN = b"edgefl/threshold/challenge/v1\x00"
_CONTEXT_DOMAIN = b"edgefl/threshold/context/v1\x00"
_SHARE_VERSION = 1
_SHARE_HEADER = struct.Struct(">BHI")  # version, index, count
_CHALLENGE_BYTES = SECURITY_BITS // 8
_SIEVE_LIMIT = 1 << 18
_SIEVE_WINDOW = 1 << 15
# Below this many ciphertexts worker start-up costs more than it saves.
_PARALLEL_MIN = 16


# --------------------------------------------------------------------------- errors


class ThresholdError(CryptoError):
    """A threshold-decryption operation failed."""

    reason = "threshold"


class InvalidShareError(ThresholdError):
    """A holder's decryption share is malformed or its proof does not verify.

    Attributes:
        index: the holder's index (1..N) as claimed by the share.
        reason: machine-readable cause: ``"index"``, ``"count"``, ``"range"``,
            ``"not_unit"``, ``"proof"`` or ``"duplicate"``.
        detail: a human-readable description.
    """

    def __init__(self, index: int, reason: str, detail: str = "") -> None:
        text = f"decryption share of holder {index} rejected ({reason})"
        super().__init__(f"{text}: {detail}" if detail else text, reason=reason)
        self.index = index
        self.detail = detail


class InsufficientSharesError(ThresholdError):
    """Fewer than T acceptable decryption shares remain.

    Attributes:
        needed: the threshold T.
        accepted: indices of the acceptable shares.
        rejected: the rejections, each naming the holder and why.
    """

    reason = "insufficient_shares"

    def __init__(
        self,
        needed: int,
        accepted: Sequence[int],
        rejected: Sequence[InvalidShareError] = (),
    ) -> None:
        bad = ", ".join(f"holder {e.index}: {e.reason}" for e in rejected)
        message = (
            f"need {needed} valid decryption shares, have {len(accepted)} "
            f"(accepted: {sorted(accepted)}" + (f"; rejected: {bad})" if bad else ")")
        )
        super().__init__(message)
        self.needed = needed
        self.accepted = tuple(accepted)
        self.rejected = tuple(rejected)


# --------------------------------------------------------------------------- helpers


def _min_bytes(x: int) -> bytes:
    return x.to_bytes((x.bit_length() + 7) // 8, "big")


def _lp(x: int) -> bytes:
    raw = _min_bytes(x)
    return struct.pack(">I", len(raw)) + raw


def _randbits(source: RandomSource, k: int) -> int:
    nbytes = (k + 7) // 8
    return int.from_bytes(source.random_bytes(nbytes), "big") >> (8 * nbytes - k)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_int(x: Any, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an int, got bool")
    if isinstance(x, int):
        return x
    if isinstance(x, type(gmpy2.mpz(0))):
        return int(x)
    raise TypeError(f"{what} must be an int, got {type(x).__name__}")


# --------------------------------------------------------------------------- safe primes

_sieve_cache: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], list[int]] | None = None


def _sieve_primes() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], list[int]]:
    """Odd primes 5 <= l < _SIEVE_LIMIT, their inverses of 6, and the same as a list."""
    global _sieve_cache
    if _sieve_cache is None:
        flags = np.ones(_SIEVE_LIMIT, dtype=bool)
        flags[:2] = False
        for k in range(2, math.isqrt(_SIEVE_LIMIT) + 1):
            if flags[k]:
                flags[k * k :: k] = False
        primes = np.flatnonzero(flags)
        primes = primes[primes >= 5].astype(np.int64)
        plist = [int(x) for x in primes]
        inv6 = np.array([pow(6, -1, ell) for ell in plist], dtype=np.int64)
        _sieve_cache = (primes, inv6, plist)
    return _sieve_cache


def generate_safe_prime(
    bits: int, rng: RandomSource | None = None, *, rounds: int = PRIME_ROUNDS
) -> int:
    """Return a random safe prime ``p = 2p' + 1`` (p and p' prime) of exactly ``bits`` bits.

    The two top bits of ``p`` are set, so the product of two such primes of
    ``b1`` and ``b2`` bits has exactly ``b1 + b2`` bits. Search: a random start
    ``p' = 5 mod 6`` (every safe prime above 7 has it), a window of candidates
    ``p' + 6t`` sieved so that neither ``p'`` nor ``2p' + 1`` has a prime
    factor below 2^18, then a base-2 Fermat test on each, and finally
    ``gmpy2.is_prime(x, rounds)`` on both. Walking a window from a random
    start slightly favours primes after long gaps; that is the usual
    incremental-search trade-off (as in OpenSSL) and not a known weakness.

    Args:
        bits: size of p, in [8, MAX_KEY_BITS].
        rng: randomness (default: the OS CSPRNG).
        rounds: Miller-Rabin rounds for both p' and p.

    Returns:
        The safe prime p.

    Raises:
        ValueError: unsupported size.
    """
    if not _is_int(bits) or not 8 <= bits <= MAX_KEY_BITS:
        raise ValueError(f"safe prime bits must be an int in [8, {MAX_KEY_BITS}], got {bits!r}")
    source = default_random() if rng is None else rng
    qbits = bits - 1  # p' has one bit less than p; its top two bits are set.
    lo, hi = 3 << (qbits - 2), 1 << qbits
    all_primes, all_inv6, all_list = _sieve_primes()
    usable = int(np.searchsorted(all_primes, math.isqrt(lo), side="right"))
    primes, inv6, plist = all_primes[:usable], all_inv6[:usable], all_list[:usable]
    half = (primes - 1) // 2
    two, mpz = gmpy2.mpz(2), gmpy2.mpz
    while True:
        start = lo + randbelow(source, hi - lo)
        start += (5 - start) % 6
        count = min(_SIEVE_WINDOW, (hi - 1 - start) // 6 + 1)
        if count <= 0:
            continue
        keep = np.ones(count, dtype=bool)
        if usable:
            residues = np.array([start % ell for ell in plist], dtype=np.int64)
            # l divides start+6t iff t = -start/6; l divides 2(start+6t)+1 iff t = ((l-1)/2-start)/6
            hits = (
                (-residues) % primes * inv6 % primes,
                (half - residues) % primes * inv6 % primes,
            )
            small = int(np.searchsorted(primes, count, side="left"))
            for offsets in hits:
                for ell, t in zip(plist[:small], offsets[:small].tolist(), strict=True):
                    keep[t::ell] = False
                big = offsets[small:]
                keep[big[big < count]] = False
        for t in np.flatnonzero(keep).tolist():
            x = mpz(start + 6 * t)
            if gmpy2.powmod(two, x - 1, x) != 1:
                continue
            p = 2 * x + 1
            if gmpy2.powmod(two, p - 1, p) != 1:
                continue
            if gmpy2.is_prime(x, rounds) and gmpy2.is_prime(p, rounds):
                return int(p)


def _is_safe_prime(p: int, rounds: int = PRIME_ROUNDS) -> bool:
    return p > 5 and p % 2 == 1 and gmpy2.is_prime(p, rounds) and gmpy2.is_prime(p // 2, rounds)


# --------------------------------------------------------------------------- committee


@dataclass(frozen=True, slots=True)
class CommitteePublic:
    """The public description of a T-of-N key-holder committee.

    Attributes:
        n: the Paillier modulus (``public_key.n``).
        threshold: T, the number of holders needed to decrypt.
        holders: N, the number of share holders (indices 1..N).
        delta: ``N!``.
        v: the verification base (a square generating the squares of ``Z*_{n^2}``).
        verification_keys: ``v_i = v^(delta * s_i) mod n^2`` for i = 1..N.
        fingerprint: lowercase hex SHA-256 of the domain ``edgefl/threshold-committee/v1`` + NUL
            || T (4 bytes) || N (4 bytes) || n || delta || v || v_1 .. v_N, each
            integer as a 4-byte big-endian length then minimal big-endian bytes.
        public_key: the ordinary Paillier public key devices encrypt under.
    """

    n: int
    threshold: int
    holders: int
    delta: int
    v: int
    verification_keys: tuple[int, ...]
    fingerprint: str = field(init=False, compare=False)
    public_key: PaillierPublicKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("n", "threshold", "holders", "delta", "v"):
            value = getattr(self, name)
            if not _is_int(value) and not isinstance(value, type(gmpy2.mpz(0))):
                raise ValueError(f"committee field {name!r} must be an integer")
            set_(self, name, int(value))
        try:
            public_key = PaillierPublicKey(n=self.n)
        except ValueError as exc:
            raise ValueError(f"committee field 'n' is not a valid modulus: {exc}") from exc
        if not 1 <= self.holders <= MAX_HOLDERS:
            raise ValueError(f"committee field 'holders' must be in [1, {MAX_HOLDERS}]")
        if not 1 <= self.threshold <= self.holders:
            raise ValueError("committee field 'threshold' must be in [1, holders]")
        if self.delta != math.factorial(self.holders):
            raise ValueError("committee field 'delta' must equal holders!")
        if math.gcd(self.delta, self.n) != 1:
            raise ValueError("committee field 'n' has a prime factor <= holders")
        nsq = self.n * self.n
        keys = tuple(self.verification_keys)
        if len(keys) != self.holders:
            raise ValueError(
                f"committee field 'verification_keys' has {len(keys)} entries, "
                f"expected {self.holders}"
            )
        clean: list[int] = []
        for pos, key in enumerate((self.v, *keys)):
            what = "'v'" if pos == 0 else f"'verification_keys'[{pos - 1}] (holder {pos})"
            if not _is_int(key) and not isinstance(key, type(gmpy2.mpz(0))):
                raise ValueError(f"committee field {what} must be an integer")
            key = int(key)
            if not 1 < key < nsq or math.gcd(key, self.n) != 1:
                raise ValueError(f"committee field {what} must be a unit in (1, n^2)")
            # Squares modulo n have Jacobi symbol 1: a cheap sanity check.
            if gmpy2.jacobi(key % self.n, self.n) != 1:
                raise ValueError(f"committee field {what} is not a square")
            clean.append(key)
        set_(self, "verification_keys", tuple(clean[1:]))
        digest = hashlib.sha256(self._canonical()).hexdigest()
        set_(self, "fingerprint", digest)
        set_(self, "public_key", public_key)

    def _canonical(self) -> bytes:
        parts = [_COMMITTEE_DOMAIN, struct.pack(">II", self.threshold, self.holders)]
        parts += [_lp(self.n), _lp(self.delta), _lp(self.v)]
        parts += [_lp(key) for key in self.verification_keys]
        return b"".join(parts)

    @property
    def nsquare(self) -> int:
        """``n^2``."""
        return self.public_key.nsquare

    @property
    def ciphertext_bytes(self) -> int:
        """Width of one ciphertext or decryption-share value (bytes of ``n^2``)."""
        return self.public_key.ciphertext_bytes

    @property
    def nonce_bits(self) -> int:
        """Bits of the proof's random exponent ``r``: |n^2| + |delta| + 2 * 128."""
        return self.nsquare.bit_length() + self.delta.bit_length() + 2 * SECURITY_BITS

    @property
    def response_bytes(self) -> int:
        """Fixed width of the proof response ``z`` (``z < 2^(nonce_bits + 1)``)."""
        return (self.nonce_bits + 1 + 7) // 8

    def to_dict(self) -> dict[str, Any]:
        """The committee as a JSON-ready dict (integers as lowercase hex)."""
        return {
            "format": COMMITTEE_FORMAT,
            "version": 1,
            "bits": self.public_key.bits,
            "n": format(self.n, "x"),
            "public_key_fingerprint": self.public_key.fingerprint,
            "threshold": self.threshold,
            "holders": self.holders,
            "delta": format(self.delta, "x"),
            "v": format(self.v, "x"),
            "verification_keys": [format(key, "x") for key in self.verification_keys],
            "fingerprint": self.fingerprint,
        }

    def to_json(self) -> str:
        """The committee as JSON text (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, min_bits: int = MIN_KEY_BITS) -> CommitteePublic:
        """Validate and build a committee from :meth:`to_dict` output.

        Args:
            data: the parsed JSON object.
            min_bits: smallest modulus accepted.

        Raises:
            ValueError: a field is missing or invalid (the message names it), or
                the stored fingerprint does not match the recomputed one.
        """
        if not isinstance(data, dict):
            raise ValueError("a committee must be a JSON object")
        if data.get("format") != COMMITTEE_FORMAT or data.get("version") != 1:
            raise ValueError(f"committee field 'format'/'version' must be {COMMITTEE_FORMAT}/1")

        def hex_field(name: str, value: Any) -> int:
            if not isinstance(value, str) or not value or value.strip() != value:
                raise ValueError(f"committee field {name!r} must be a hex string")
            if value != value.lower() or (len(value) > 1 and value[0] == "0"):
                raise ValueError(f"committee field {name!r} is not canonical lowercase hex")
            try:
                return int(value, 16)
            except ValueError as exc:
                raise ValueError(f"committee field {name!r} is not hex") from exc

        def int_field(name: str) -> int:
            value = data.get(name)
            if not _is_int(value):
                raise ValueError(f"committee field {name!r} must be an integer")
            assert isinstance(value, int)
            return value

        n = hex_field("n", data.get("n"))
        if n.bit_length() < min_bits:
            raise ValueError(
                f"committee field 'n' has {n.bit_length()} bits, minimum is {min_bits}"
            )
        keys_raw = data.get("verification_keys")
        if not isinstance(keys_raw, list):
            raise ValueError("committee field 'verification_keys' must be a list")
        committee = cls(
            n=n,
            threshold=int_field("threshold"),
            holders=int_field("holders"),
            delta=hex_field("delta", data.get("delta")),
            v=hex_field("v", data.get("v")),
            verification_keys=tuple(
                hex_field(f"verification_keys[{i}]", x) for i, x in enumerate(keys_raw)
            ),
        )
        if data.get("bits") != committee.public_key.bits:
            raise ValueError("committee field 'bits' does not match 'n'")
        if data.get("public_key_fingerprint") != committee.public_key.fingerprint:
            raise ValueError("committee field 'public_key_fingerprint' does not match 'n'")
        if data.get("fingerprint") != committee.fingerprint:
            raise ValueError("committee field 'fingerprint' does not match the committee")
        return committee

    @classmethod
    def from_json(cls, text: str | bytes, *, min_bits: int = MIN_KEY_BITS) -> CommitteePublic:
        """Parse and validate :meth:`to_json` output.

        Raises:
            ValueError: not JSON, or any field invalid (the message names it).
        """
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("committee is not valid JSON") from exc
        return cls.from_dict(data, min_bits=min_bits)


@dataclass(frozen=True, slots=True, repr=False)
class HolderShare:
    """One holder's secret: its index and ``s_i = f(i)``, plus the committee.

    Construction checks ``v^(delta * s_i) == v_i`` (a share paired with the
    wrong committee or index is refused).
    """

    committee: CommitteePublic
    index: int
    secret: int

    def __post_init__(self) -> None:
        index = _as_int(self.index, "index")
        secret = _as_int(self.secret, "secret")
        committee = self.committee
        if not 1 <= index <= committee.holders:
            raise ValueError(f"share index must be in [1, {committee.holders}], got {index}")
        if not 0 <= secret < committee.nsquare:
            raise ValueError("share secret is out of range")
        nsq = gmpy2.mpz(committee.nsquare)
        expected = committee.verification_keys[index - 1]
        if gmpy2.powmod(committee.v, committee.delta * secret, nsq) != expected:
            raise ValueError(f"share {index} does not match the committee's verification key")
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "secret", secret)

    def __repr__(self) -> str:
        return (
            f"HolderShare(index={self.index}, secret=<hidden>, "
            f"committee={self.committee.fingerprint[:16]}...)"
        )


@dataclass(frozen=True, slots=True, repr=False)
class Ceremony:
    """What the dealer hands out: the public key, the committee and the N shares."""

    public_key: PaillierPublicKey
    committee: CommitteePublic
    shares: list[HolderShare]

    def __repr__(self) -> str:
        c = self.committee
        return (
            f"Ceremony({c.threshold}-of-{c.holders}, bits={self.public_key.bits}, "
            f"committee={c.fingerprint[:16]}..., shares=<hidden>)"
        )


def _random_unit(source: RandomSource, n: int, bound: int) -> int:
    while True:
        r = randbelow(source, bound - 1) + 1
        if math.gcd(r, n) == 1:
            return r


def ceremony(
    bits: int,
    *,
    holders: int,
    threshold: int,
    rng: RandomSource | None = None,
    primes: tuple[int, int] | None = None,
    allow_insecure_size: bool = False,
) -> Ceremony:
    """Trusted-dealer key generation for a T-of-N committee.

    Draws, in this order from ``rng``: the safe primes (unless ``primes`` is
    given), the T - 1 polynomial coefficients (each uniform in ``[0, n*m)``),
    then ``r`` for ``v = r^2 mod n^2`` (redrawn until ``v`` generates the
    squares). The same ``rng`` stream therefore reproduces the same ceremony
    (known-answer vectors). p, q, m and d are deleted before returning.

    Args:
        bits: modulus size (``n.bit_length()``); >= 2048 unless ``allow_insecure_size``.
        holders: N, in [1, MAX_HOLDERS].
        threshold: T, in [1, N].
        rng: randomness (default: the OS CSPRNG).
        primes: two known safe primes ``(p, q)`` (tests and vectors);
            ``(p*q).bit_length()`` must equal ``bits``.
        allow_insecure_size: accept ``bits < 2048`` (tests only: factorable).

    Returns:
        The :class:`Ceremony`.

    Raises:
        ValueError: bad sizes, counts or primes.
    """
    if not _is_int(holders) or not 1 <= holders <= MAX_HOLDERS:
        raise ValueError(f"holders must be an int in [1, {MAX_HOLDERS}], got {holders!r}")
    if not _is_int(threshold) or not 1 <= threshold <= holders:
        raise ValueError(f"threshold must be an int in [1, holders={holders}], got {threshold!r}")
    if not _is_int(bits) or bits > MAX_KEY_BITS:
        raise ValueError(f"bits must be an int <= {MAX_KEY_BITS}, got {bits!r}")
    if bits < MIN_KEY_BITS and not allow_insecure_size:
        raise ValueError(
            f"{bits}-bit keys are insecure (minimum {MIN_KEY_BITS}); "
            "pass allow_insecure_size=True for tests only"
        )
    if bits < 8:
        raise ValueError(f"bits must be >= 8, got {bits}")
    source = default_random() if rng is None else rng
    if primes is not None:
        p, q = (_as_int(x, "prime") for x in primes)
        for x in (p, q):
            if not _is_safe_prime(x):
                raise ValueError(f"{x} is not a safe prime")
        if p == q:
            raise ValueError("the two safe primes must be distinct")
        if (p * q).bit_length() != bits:
            raise ValueError(f"p*q has {(p * q).bit_length()} bits, not {bits}")
        if min(p, q) // 2 <= holders:
            raise ValueError(f"the primes' halves (p-1)/2, (q-1)/2 must exceed holders={holders}")
        if math.gcd((p // 2) * (q // 2), p * q) != 1:
            raise ValueError("gcd(m, n) != 1 for these primes")
    else:
        while True:
            p = generate_safe_prime(bits - bits // 2, source)
            q = generate_safe_prime(bits // 2, source)
            if p != q and min(p, q) // 2 > holders and math.gcd((p // 2) * (q // 2), p * q) == 1:
                break
    n = p * q
    nsq = n * n
    m = (p // 2) * (q // 2)
    nm = n * m
    d = m * int(gmpy2.invert(m, n))
    coefficients = [d] + [randbelow(source, nm) for _ in range(threshold - 1)]
    secrets_ = []
    for i in range(1, holders + 1):
        acc = 0
        for a in reversed(coefficients):
            acc = (acc * i + a) % nm
        secrets_.append(acc)
    # v must generate Q (order n*m = p*q*p'*q'): v^(nm/l) != 1 for each prime l.
    order_factors = (p, q, p // 2, q // 2)
    while True:
        v = pow(_random_unit(source, n, nsq), 2, nsq)
        if all(gmpy2.powmod(v, nm // ell, nsq) != 1 for ell in order_factors):
            break
    delta = math.factorial(holders)
    mv, mnsq = gmpy2.mpz(v), gmpy2.mpz(nsq)
    vks = tuple(int(gmpy2.powmod(mv, delta * s, mnsq)) for s in secrets_)
    del p, q, m, d, nm, coefficients, order_factors
    committee = CommitteePublic(
        n=n, threshold=threshold, holders=holders, delta=delta, v=v, verification_keys=vks
    )
    shares = [HolderShare(committee, i + 1, s) for i, s in enumerate(secrets_)]
    del secrets_
    return Ceremony(public_key=committee.public_key, committee=committee, shares=shares)


# --------------------------------------------------------------------------- share files


def save_share(
    share: HolderShare,
    path: str | os.PathLike[str],
    *,
    passphrase: bytes | str | None,
    insecure_unencrypted: bool = False,
    overwrite: bool = False,
    scrypt_n: int = _SCRYPT_DEFAULT["n"],
) -> Path:
    """Write a holder's share file (mode 0600), sealed like a secret key file.

    JSON with ``format = "edgefl-threshold-share"``, version 1, the whole
    committee (public), its fingerprint, the holder index and, sealed with
    AES-256-GCM under a scrypt key (header as associated data), ``s_i`` as
    ``ciphertext_bytes`` big-endian bytes. Written atomically.

    Args:
        share: the holder's share.
        path: target file.
        passphrase: passphrase; ``None`` only with ``insecure_unencrypted=True``.
        insecure_unencrypted: store ``s_i`` in clear (explicit opt-in).
        overwrite: replace an existing file.
        scrypt_n: scrypt cost (power of two, default 2^15).

    Raises:
        ValueError: neither a passphrase nor the insecure opt-in, or both.
        KeyFileError: the file exists and ``overwrite`` is False.
    """
    committee = share.committee
    header: dict[str, Any] = {
        "format": SHARE_FILE_FORMAT,
        "version": 1,
        "committee": committee.to_dict(),
        "committee_fingerprint": committee.fingerprint,
        "index": share.index,
    }
    if insecure_unencrypted:
        if passphrase is not None:
            raise ValueError("give either a passphrase or insecure_unencrypted=True, not both")
        doc = dict(header, protection="none", secret=format(share.secret, "x"))
    else:
        if passphrase is None:
            raise ValueError(
                "a passphrase is required to save a share "
                "(or pass insecure_unencrypted=True explicitly)"
            )
        payload = share.secret.to_bytes(committee.ciphertext_bytes, "big")
        doc = _seal_payload(header, payload, passphrase, scrypt_n)
    target = Path(path)
    _atomic_write(target, (json.dumps(doc, indent=2) + "\n").encode(), 0o600, overwrite=overwrite)
    return target


def load_share(
    path: str | os.PathLike[str],
    *,
    passphrase: bytes | str | None,
    expected_committee_fingerprint: str | None = None,
    allow_unencrypted: bool = False,
    min_bits: int = MIN_KEY_BITS,
) -> HolderShare:
    """Read, check and unseal a share file written by :func:`save_share`.

    Args:
        path: the file.
        passphrase: its passphrase (for sealed files).
        expected_committee_fingerprint: if given, the committee must have it.
        allow_unencrypted: accept a file saved with ``insecure_unencrypted``.
        min_bits: smallest modulus accepted.

    Raises:
        KeyFileError: group/world accessible, not a share file (a whole secret
            key file included), malformed committee, wrong committee, wrong
            passphrase or tampered file, or a share not matching its
            verification key.
    """
    target = Path(path)
    _check_permissions(target)
    data = _read_json(target, "share file")
    if data.get("format") != SHARE_FILE_FORMAT or data.get("version") != 1:
        raise KeyFileError(f"{target} is not a version-1 edgefl threshold share file")
    try:
        committee = CommitteePublic.from_dict(data.get("committee"), min_bits=min_bits)
    except ValueError as exc:
        raise KeyFileError(f"{target}: invalid committee: {exc}") from exc
    if data.get("committee_fingerprint") != committee.fingerprint:
        raise KeyFileError(f"{target}: 'committee_fingerprint' does not match the committee")
    if (
        expected_committee_fingerprint is not None
        and committee.fingerprint != expected_committee_fingerprint
    ):
        raise KeyFileError(
            f"{target}: committee {committee.fingerprint} is not the expected "
            f"{expected_committee_fingerprint}",
            reason="wrong_committee",
        )
    index = data.get("index")
    if not _is_int(index):
        raise KeyFileError(f"{target}: field 'index' must be an integer")
    assert isinstance(index, int)
    protection = data.get("protection")
    if protection == "none":
        if not allow_unencrypted:
            raise KeyFileError(
                f"{target} holds an UNENCRYPTED share; pass allow_unencrypted=True to use it"
            )
        raw = data.get("secret")
        if not isinstance(raw, str):
            raise KeyFileError(f"{target}: field 'secret' must be a hex string")
        try:
            secret = int(raw, 16)
        except ValueError as exc:
            raise KeyFileError(f"{target}: field 'secret' is not hex") from exc
    elif protection == "scrypt-aes256gcm":
        if passphrase is None:
            raise KeyFileError(f"{target} is passphrase-protected; no passphrase given")
        secret = _unseal_share(target, data, passphrase, committee.ciphertext_bytes)
    else:
        raise KeyFileError(f"{target}: unknown protection {protection!r}")
    try:
        return HolderShare(committee, index, secret)
    except ValueError as exc:
        raise KeyFileError(f"{target}: {exc}") from exc


def _unseal_share(target: Path, data: dict[str, Any], passphrase: bytes | str, width: int) -> int:
    payload = _unseal_payload(target, data, passphrase)
    if len(payload) != width:
        raise KeyFileError(f"{target}: sealed payload has the wrong length")
    return int.from_bytes(payload, "big")


# --------------------------------------------------------------------------- decryption shares


@dataclass(frozen=True, slots=True)
class DecryptionShare:
    """One holder's decryption share of a ciphertext vector, with its batch proof.

    Attributes:
        index: the holder (1..N).
        values: ``c_k^(2 * delta * s_i) mod n^2`` for every ciphertext ``c_k``.
        challenge: the proof's Fiat-Shamir challenge ``e`` (128 bits).
        response: the proof's response ``z = r + e * delta * s_i`` (an integer).
    """

    index: int
    values: tuple[int, ...]
    challenge: int
    response: int

    def to_bytes(self, committee: CommitteePublic) -> bytes:
        """Serialise: fixed-width big-endian fields.

        Layout: version (1 byte, 1) | index (2) | count K (4) | challenge (16)
        | response (``committee.response_bytes``) | K values of
        ``committee.ciphertext_bytes`` each.

        Raises:
            ValueError: a field does not fit its width.
        """
        width, zw = committee.ciphertext_bytes, committee.response_bytes
        try:
            parts = [
                _SHARE_HEADER.pack(_SHARE_VERSION, self.index, len(self.values)),
                self.challenge.to_bytes(_CHALLENGE_BYTES, "big"),
                self.response.to_bytes(zw, "big"),
            ]
            parts += [int(x).to_bytes(width, "big") for x in self.values]
        except (OverflowError, struct.error) as exc:
            raise ValueError(f"decryption share field does not fit: {exc}") from exc
        return b"".join(parts)

    @classmethod
    def from_bytes(
        cls, blob: bytes, committee: CommitteePublic, *, count: int | None = None
    ) -> DecryptionShare:
        """Decode :meth:`to_bytes` output (untrusted input; the proof is NOT checked here).

        Args:
            blob: the bytes.
            committee: the committee (gives the widths and the index range).
            count: the expected number of values, if known.

        Raises:
            DecodeError: wrong version, length (every strict prefix is
                rejected), index, count or a value outside ``(0, n^2)``.
        """
        blob = bytes(blob)
        head = _SHARE_HEADER.size
        if len(blob) < head:
            raise DecodeError(f"decryption share is {len(blob)} bytes, shorter than its header")
        version, index, k = _SHARE_HEADER.unpack_from(blob)
        if version != _SHARE_VERSION:
            raise DecodeError(f"unsupported decryption share version {version}")
        if not 1 <= index <= committee.holders:
            raise DecodeError(f"decryption share index {index} outside [1, {committee.holders}]")
        if count is not None and k != count:
            raise DecodeError(f"decryption share has {k} values, expected {count}")
        width, zw = committee.ciphertext_bytes, committee.response_bytes
        expected = head + _CHALLENGE_BYTES + zw + k * width
        if len(blob) != expected:
            raise DecodeError(f"decryption share is {len(blob)} bytes, expected {expected}")
        pos = head
        challenge = int.from_bytes(blob[pos : pos + _CHALLENGE_BYTES], "big")
        pos += _CHALLENGE_BYTES
        response = int.from_bytes(blob[pos : pos + zw], "big")
        pos += zw
        nsq = committee.nsquare
        values = []
        for j in range(k):
            x = int.from_bytes(blob[pos : pos + width], "big")
            if not 0 < x < nsq:
                raise DecodeError(f"decryption share value {j} is outside (0, n^2)")
            values.append(x)
            pos += width
        return cls(index=index, values=tuple(values), challenge=challenge, response=response)


def make_context(federation: str, round_id: int, request_digest: bytes) -> bytes:
    """Canonical proof context binding a share to (federation, round, request digest).

    Layout: domain || 4-byte length || federation (UTF-8) || round (8 bytes)
    || 4-byte length || digest.
    """
    if not _is_int(round_id) or not 0 <= round_id < 1 << 64:
        raise ValueError(f"round_id must be an int in [0, 2^64), got {round_id!r}")
    fed = federation.encode("utf-8")
    digest = bytes(request_digest)
    return b"".join(
        [
            _CONTEXT_DOMAIN,
            struct.pack(">I", len(fed)),
            fed,
            struct.pack(">Q", round_id),
            struct.pack(">I", len(digest)),
            digest,
        ]
    )


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, bytes | bytearray | memoryview):
        raise TypeError("context must be bytes")
    ctx = bytes(context)
    if not ctx:
        raise ValueError("context must not be empty: it binds the proof to one request")
    return ctx


def _transcript_seed(
    committee: CommitteePublic,
    index: int,
    context: bytes,
    ciphertexts: Sequence[Any],
    values: Sequence[Any],
) -> bytes:
    width = committee.ciphertext_bytes
    h = hashlib.sha256(_RHO_DOMAIN)
    h.update(struct.pack(">I", len(context)))
    h.update(context)
    h.update(bytes.fromhex(committee.fingerprint))
    h.update(struct.pack(">HI", index, len(ciphertexts)))
    for c in ciphertexts:
        h.update(int(c).to_bytes(width, "big"))
    for x in values:
        h.update(int(x).to_bytes(width, "big"))
    return h.digest()


def _batch_coefficients(seed: bytes, count: int) -> list[int]:
    step = SECURITY_BITS // 8
    stream = hashlib.shake_256(_RHO_DOMAIN + seed).digest(step * count)
    return [int.from_bytes(stream[k * step : (k + 1) * step], "big") for k in range(count)]


def _challenge(seed: bytes, committee: CommitteePublic, elements: Sequence[Any]) -> int:
    width = committee.ciphertext_bytes
    h = hashlib.sha256(_CHALLENGE_DOMAIN + seed)
    for x in elements:
        h.update(int(x).to_bytes(width, "big"))
    return int.from_bytes(h.digest()[:_CHALLENGE_BYTES], "big")


def _batch_bases(
    committee: CommitteePublic, seed: bytes, ciphertexts: Sequence[Any], values: Sequence[Any]
) -> tuple[Any, Any]:
    """``C = prod c_k^(4 rho_k)`` and ``C_i = prod c_{i,k}^(2 rho_k)`` modulo n^2."""
    nsq = gmpy2.mpz(committee.nsquare)
    rhos = _batch_coefficients(seed, len(ciphertexts))
    big_c = gmpy2.powmod(multi_exp(ciphertexts, rhos, committee.nsquare), 4, nsq)
    big_ci = gmpy2.powmod(multi_exp(values, rhos, committee.nsquare), 2, nsq)
    return big_c, big_ci


def _check_units(committee: CommitteePublic, values: Sequence[Any]) -> tuple[int, str] | None:
    """``(index, "range" | "not_unit")`` of the first bad value, else None.

    One gcd for the whole vector (the product of units is a unit), as
    :class:`edge_sdk.crypto.CiphertextVector` does.
    """
    nsq, n = committee.nsquare, gmpy2.mpz(committee.n)
    prod = gmpy2.mpz(1)
    for k, x in enumerate(values):
        if not 0 < x < nsq:
            return k, "range"
        prod = prod * x % n
    if gmpy2.gcd(prod, n) != 1:
        for k, x in enumerate(values):
            if gmpy2.gcd(x, n) != 1:
                return k, "not_unit"
    return None


def _check_ciphertexts(committee: CommitteePublic, ciphertexts: Sequence[int]) -> list[Any]:
    cts = [gmpy2.mpz(_as_int(c, f"ciphertext {k}")) for k, c in enumerate(ciphertexts)]
    if not cts:
        raise ValueError("need at least one ciphertext")
    if len(cts) >= 1 << 32:
        raise ValueError("too many ciphertexts for one decryption share")
    bad = _check_units(committee, cts)
    if bad is not None:
        what = "outside (0, n^2)" if bad[1] == "range" else "not a unit modulo n"
        raise InvalidCiphertextError(f"ciphertext {bad[0]} is {what}", reason=bad[1])
    return cts


def _powmod_chunk(args: tuple[list[int], int, int]) -> list[int]:
    bases, exponent, modulus = args
    e, m = gmpy2.mpz(exponent), gmpy2.mpz(modulus)
    return [int(gmpy2.powmod(b, e, m)) for b in bases]


def _raise_all(
    bases: list[Any],
    exponent: int,
    modulus: int,
    workers: int | None,
    executor: Executor | None,
) -> list[Any]:
    if (executor is None and (workers is None or workers <= 1)) or len(bases) < _PARALLEL_MIN:
        e, m = gmpy2.mpz(exponent), gmpy2.mpz(modulus)
        return [gmpy2.powmod(b, e, m) for b in bases]
    from edge_sdk.crypto._parallel import default_workers, process_executor

    parts = workers if workers is not None and workers > 1 else default_workers()
    parts = max(1, min(parts, len(bases) // 2))
    size = -(-len(bases) // parts)
    jobs = [
        ([int(b) for b in bases[i : i + size]], exponent, modulus)
        for i in range(0, len(bases), size)
    ]
    if executor is not None:
        results = list(executor.map(_powmod_chunk, jobs))
    else:
        with process_executor(len(jobs)) as pool:
            results = list(pool.map(_powmod_chunk, jobs))
    return [gmpy2.mpz(x) for part in results for x in part]


def decryption_share(
    share: HolderShare,
    ciphertexts: Sequence[int],
    *,
    context: bytes,
    rng: RandomSource | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
) -> DecryptionShare:
    """Compute holder ``i``'s decryption share of a ciphertext vector, with one batch proof.

    ``c_{i,k} = c_k^(2 * delta * s_i) mod n^2`` for every k; then a
    non-interactive Chaum-Pedersen proof that ``log_{C}(C_i) = log_v(v_i)``
    (= ``delta * s_i``) for the batched bases

    * ``rho_1..rho_K`` = 128-bit integers from SHAKE-256 over a SHA-256 seed of
      (domain, context, committee fingerprint, i, K, every ``c_k``, every ``c_{i,k}``);
    * ``C = prod c_k^(4 rho_k)``, ``C_i = prod c_{i,k}^(2 rho_k)``;
    * ``r`` uniform below ``2^(|n^2| + |delta| + 256)``, ``a = C^r``, ``b = v^r``;
    * ``e`` = the first 128 bits of SHA-256(domain, seed, C, C_i, a, b);
    * ``z = r + e * delta * s_i`` over the integers.

    The proof is ``(e, z)``; a verifier recomputes ``a = C^z * C_i^-e``,
    ``b = v^z * v_i^-e`` and checks the hash, which is the same as checking
    ``C^z == a * C_i^e`` and ``v^z == b * v_i^e`` for transmitted a, b (and
    1 KiB shorter at 2048 bits).

    Soundness of the batching. Let ``x = delta * s_i = log_v(v_i)`` and
    ``eps_k = c_{i,k}^2 / c_k^(4x)``, a square. If the proof verifies then
    (special soundness, e < 2^128 < every prime factor of the order n*m of
    the squares Q) ``C_i = C^x``, i.e. ``prod eps_k^(rho_k) = 1``. The rho are
    derived AFTER the c_{i,k} are fixed (they hash them: this is why rho must
    depend on the shares; with rho known in advance a prover could pick errors
    that cancel), so if some ``eps_j != 1`` its order is a product of primes
    > 2^128 and, for any fixed other rho, at most one rho_j in [0, 2^128)
    satisfies the product: a cheating share passes with probability about
    2^-128 per hash query. Hence every ``c_{i,k}^2 = c_k^(4x)``: ``c_{i,k}``
    is right up to an element of order 2 (``-1`` and friends), which the
    proof cannot see because it works in Q; that is exactly why the
    statement is about ``c_k^4`` and ``c_{i,k}^2`` (both in Q) and why
    :func:`combine` raises each share to ``2 * lambda_i`` (even), which kills
    order-2 elements. Zero knowledge: z hides ``e * x`` (< 2^(|n^2| + |delta|
    + 128)) statistically within 2^-128 because r has 128 more bits.
    With toy keys (tests, vectors) p' and q' are small and the bounds are
    weaker; the arithmetic is the same.

    The holder computes whatever it is given: the caller (the key-holder
    service) decides which sums may be decrypted, as with a whole key.

    Args:
        share: this holder's share.
        ciphertexts: the vector (each in (0, n^2) and a unit modulo n).
        context: non-empty bytes binding the proof to one request, e.g.
            :func:`make_context` (federation, round, request digest): a share
            cannot be replayed for another sum.
        rng: randomness for ``r`` (default: the OS CSPRNG).
        workers: processes for the exponentiations (default: this process).
        executor: an existing process pool to use instead.

    Returns:
        The :class:`DecryptionShare`.

    Raises:
        InvalidCiphertextError: a ciphertext is out of range or not a unit.
        ValueError: empty context or empty vector.
    """
    ctx = _check_context(context)
    committee = share.committee
    cts = _check_ciphertexts(committee, ciphertexts)
    exponent = 2 * committee.delta * share.secret
    values = _raise_all(cts, exponent, committee.nsquare, workers, executor)
    del exponent
    return _prove(share, cts, values, ctx, default_random() if rng is None else rng)


def _prove(
    share: HolderShare,
    cts: Sequence[Any],
    values: Sequence[Any],
    ctx: bytes,
    source: RandomSource,
) -> DecryptionShare:
    """The batch proof for given share values (tests call it with wrong values)."""
    committee = share.committee
    nsq = committee.nsquare
    seed = _transcript_seed(committee, share.index, ctx, cts, values)
    big_c, big_ci = _batch_bases(committee, seed, cts, values)
    r = _randbits(source, committee.nonce_bits)
    mnsq = gmpy2.mpz(nsq)
    a = gmpy2.powmod(big_c, r, mnsq)
    b = gmpy2.powmod(committee.v, r, mnsq)
    e = _challenge(seed, committee, (big_c, big_ci, a, b))
    z = r + e * committee.delta * share.secret
    del r
    return DecryptionShare(
        index=share.index, values=tuple(int(x) for x in values), challenge=e, response=z
    )


def verify_share(
    committee: CommitteePublic,
    ciphertexts: Sequence[int],
    dshare: DecryptionShare,
    *,
    context: bytes,
) -> None:
    """Check a decryption share and its batch proof (see :func:`decryption_share`).

    Args:
        committee: the committee.
        ciphertexts: the vector the share claims to decrypt.
        dshare: the share.
        context: the request context the proof must be bound to.

    Raises:
        InvalidShareError: index out of range (``reason="index"``), wrong
            number of values (``"count"``), a value outside (0, n^2) or
            not a unit (``"range"``/``"not_unit"``), or a failing proof
            (``"proof"``: another context, another vector, a wrong exponent,
            an edited value).
        InvalidCiphertextError: a ciphertext itself is invalid.
    """
    ctx = _check_context(context)
    index = dshare.index
    if not _is_int(index) or not 1 <= index <= committee.holders:
        raise InvalidShareError(
            index if _is_int(index) else -1, "index", f"outside [1, {committee.holders}]"
        )
    cts = _check_ciphertexts(committee, ciphertexts)
    if len(dshare.values) != len(cts):
        raise InvalidShareError(
            index, "count", f"{len(dshare.values)} values for {len(cts)} ciphertexts"
        )
    nsq = committee.nsquare
    values = []
    for k, x in enumerate(dshare.values):
        if not _is_int(x) and not isinstance(x, type(gmpy2.mpz(0))):
            raise InvalidShareError(index, "range", f"value {k} is not an integer")
        if not 0 < x < nsq:
            raise InvalidShareError(index, "range", f"value {k} is outside (0, n^2)")
        values.append(gmpy2.mpz(x))
    bad = _check_units(committee, values)
    if bad is not None:
        raise InvalidShareError(index, bad[1], f"value {bad[0]} is not a unit modulo n")
    e, z = dshare.challenge, dshare.response
    if not _is_int(e) or not 0 <= e < 1 << SECURITY_BITS:
        raise InvalidShareError(index, "proof", "challenge out of range")
    if not _is_int(z) or not 0 <= z < 1 << (committee.nonce_bits + 1):
        raise InvalidShareError(index, "proof", "response out of range")
    seed = _transcript_seed(committee, index, ctx, cts, values)
    big_c, big_ci = _batch_bases(committee, seed, cts, values)
    mnsq = gmpy2.mpz(nsq)
    vi = gmpy2.mpz(committee.verification_keys[index - 1])
    try:
        a = gmpy2.powmod(big_c, z, mnsq) * gmpy2.powmod(big_ci, -e, mnsq) % mnsq
        b = gmpy2.powmod(committee.v, z, mnsq) * gmpy2.powmod(vi, -e, mnsq) % mnsq
    except ZeroDivisionError as exc:  # pragma: no cover - units were checked
        raise InvalidShareError(index, "not_unit", "a batched base is not invertible") from exc
    if _challenge(seed, committee, (big_c, big_ci, a, b)) != e:
        raise InvalidShareError(index, "proof", "the proof of correct decryption does not verify")


# --------------------------------------------------------------------------- combination


def lagrange_coefficients(indices: Sequence[int], delta: int) -> dict[int, int]:
    """Integer Lagrange coefficients at 0 scaled by ``delta``.

    ``lambda_i = delta * prod_{j != i} j / (j - i)`` for i in ``indices``
    (exact: ``delta = N!`` makes every coefficient an integer).

    Raises:
        ValueError: duplicate or non-positive indices, or delta too small.
    """
    idx = [int(i) for i in indices]
    if len(set(idx)) != len(idx) or any(i < 1 for i in idx):
        raise ValueError(f"indices must be distinct and >= 1, got {idx}")
    out: dict[int, int] = {}
    for i in idx:
        num, den = delta, 1
        for j in idx:
            if j != i:
                num *= j
                den *= j - i
        if num % den:
            raise ValueError(f"delta={delta} does not make lambda_{i} an integer")
        out[i] = num // den
    return out


def _combine_exact(
    committee: CommitteePublic, count: int, chosen: Sequence[DecryptionShare]
) -> list[int]:
    n, nsq = gmpy2.mpz(committee.n), gmpy2.mpz(committee.nsquare)
    lambdas = lagrange_coefficients([s.index for s in chosen], committee.delta)
    inv = gmpy2.invert(4 * committee.delta * committee.delta % n, n)
    out: list[int] = []
    for k in range(count):
        pos, neg = gmpy2.mpz(1), gmpy2.mpz(1)
        for s in chosen:
            lam = lambdas[s.index]
            term = gmpy2.powmod(s.values[k], 2 * abs(lam), nsq)
            if lam >= 0:
                pos = pos * term % nsq
            else:
                neg = neg * term % nsq
        try:
            combined = pos * gmpy2.invert(neg, nsq) % nsq
        except ZeroDivisionError as exc:
            raise ThresholdError(f"ciphertext {k}: a share value is not a unit") from exc
        if combined % n != 1:
            raise ThresholdError(
                f"ciphertext {k}: the shares do not combine to 1 + n*m "
                "(an unverified share is wrong, or the ciphertexts differ)"
            )
        out.append(int((combined - 1) // n * inv % n))
    return out


def combine(
    committee: CommitteePublic, ciphertexts_count: int, shares: Sequence[DecryptionShare]
) -> list[int]:
    """Combine T verified decryption shares into the plaintexts.

    Uses the first T shares with distinct indices (later ones are ignored).
    The shares must have been checked with :func:`verify_share`; use
    :func:`combine_robust` for shares straight from the network.

    Args:
        committee: the committee.
        ciphertexts_count: number of ciphertexts (every share must have this many values).
        shares: at least T shares.

    Returns:
        The plaintexts ``m_k`` in ``[0, n)``.

    Raises:
        InsufficientSharesError: fewer than T distinct indices.
        InvalidShareError: a share has the wrong count or an index out of range.
        ThresholdError: the shares do not combine (one of them is wrong).
    """
    chosen: list[DecryptionShare] = []
    seen: set[int] = set()
    for s in shares:
        if not 1 <= s.index <= committee.holders:
            raise InvalidShareError(s.index, "index", f"outside [1, {committee.holders}]")
        if len(s.values) != ciphertexts_count:
            raise InvalidShareError(
                s.index, "count", f"{len(s.values)} values for {ciphertexts_count} ciphertexts"
            )
        if s.index in seen:
            continue
        seen.add(s.index)
        chosen.append(s)
        if len(chosen) == committee.threshold:
            break
    if len(chosen) < committee.threshold:
        raise InsufficientSharesError(committee.threshold, sorted(seen))
    return _combine_exact(committee, ciphertexts_count, chosen)


@dataclass(frozen=True, slots=True)
class CombineResult:
    """What :func:`combine_robust` returns.

    Attributes:
        plaintexts: the decrypted values.
        used: the indices of the T shares combined.
        rejected: every rejected share, each naming the holder and the reason.
    """

    plaintexts: list[int]
    used: tuple[int, ...]
    rejected: tuple[InvalidShareError, ...]


def combine_robust(
    committee: CommitteePublic,
    ciphertexts: Sequence[int],
    shares: Sequence[DecryptionShare],
    *,
    context: bytes,
) -> CombineResult:
    """Verify every share, set aside the bad ones, combine T good ones.

    An exact duplicate of an already seen share is ignored; a different share
    claiming an index already seen is rejected (``reason="duplicate"``).

    Args:
        committee: the committee.
        ciphertexts: the vector being decrypted.
        shares: shares from the holders (untrusted).
        context: the request context every proof must be bound to.

    Returns:
        The plaintexts, the indices used and the rejections.

    Raises:
        InsufficientSharesError: fewer than T good shares; it lists who was rejected and why.
        InvalidCiphertextError: a ciphertext itself is invalid.
    """
    good: dict[int, DecryptionShare] = {}
    rejected: list[InvalidShareError] = []
    for s in shares:
        previous = good.get(s.index)
        if previous is not None:
            if previous != s:
                rejected.append(
                    InvalidShareError(s.index, "duplicate", "a second, different share")
                )
            continue
        try:
            verify_share(committee, ciphertexts, s, context=context)
        except InvalidShareError as exc:
            rejected.append(exc)
            continue
        good[s.index] = s
    if len(good) < committee.threshold:
        raise InsufficientSharesError(committee.threshold, sorted(good), rejected)
    chosen = [good[i] for i in sorted(good)[: committee.threshold]]
    plaintexts = _combine_exact(committee, len(ciphertexts), chosen)
    return CombineResult(
        plaintexts=plaintexts, used=tuple(s.index for s in chosen), rejected=tuple(rejected)
    )
