"""Paillier key types, key generation and the canonical public-key encoding.

Trust model: devices and the aggregator hold only a :class:`PaillierPublicKey`.
The :class:`PaillierPrivateKey` (the primes ``p`` and ``q``) lives with the key
holder alone; it decrypts only aggregates. Keys are generated with
python-paillier (``phe``), whose prime generation is backed by gmpy2 and the
OS's CSPRNG; all arithmetic afterwards uses gmpy2 directly (``phe`` objects are
slow and validate nothing they deserialise).

The generator is ``g = n + 1``, so ``g^m = 1 + n*m (mod n^2)`` and encryption
is ``c = (1 + n*m) * r^n mod n^2`` (see :mod:`edge_sdk.crypto.ciphertext`).

Compatibility rule for the public-key encoding: the version byte is checked
first; a new layout gets a new version, old versions stay readable.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import gmpy2

from edge_sdk.errors import DecodeError

__all__ = [
    "ALLOWED_KEY_BITS",
    "MIN_KEY_BITS",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "generate_keypair",
    "public_key_from_bytes",
    "public_key_to_bytes",
]

#: Key sizes ``generate_keypair`` accepts without ``allow_insecure_size``.
ALLOWED_KEY_BITS = (2048, 3072, 4096)
#: Smallest modulus accepted from the wire or a key file unless told otherwise.
MIN_KEY_BITS = 2048
#: Largest modulus accepted anywhere (bounds the work an untrusted key can cause).
MAX_KEY_BITS = 8192

_FINGERPRINT_DOMAIN = b"edgefl/paillier-public-key/v1\x00"
_PUBLIC_KEY_VERSION = 1


def _n_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _canonical_n(n: int) -> bytes:
    """Canonical encoding of ``n``: 4-byte big-endian length, then minimal big-endian bytes."""
    raw = _n_bytes(n)
    return struct.pack(">I", len(raw)) + raw


@dataclass(frozen=True, slots=True, eq=False)
class PaillierPublicKey:
    """A Paillier public key with generator ``g = n + 1``.

    Attributes:
        n: the modulus (an odd product of two distinct primes).
        nsquare: ``n * n``.
        bits: ``n.bit_length()`` (2048 for a "2048-bit key").
        fingerprint: lowercase hex SHA-256 over a domain-separated canonical
            encoding of ``n``. Peers compare fingerprints, never moduli by eye.
        ciphertext_bytes: fixed width of one serialised ciphertext (bytes of ``n^2``).
    """

    n: int
    nsquare: int = field(init=False)
    bits: int = field(init=False)
    fingerprint: str = field(init=False)
    ciphertext_bytes: int = field(init=False)
    _n: Any = field(init=False, repr=False)
    _nsq: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.n
        if isinstance(n, bool) or not isinstance(n, int):
            n = int(n)  # gmpy2.mpz and friends
        if n < 15 or n % 2 == 0:
            raise ValueError(f"a Paillier modulus must be odd and >= 15, got {n}")
        if n.bit_length() > MAX_KEY_BITS:
            raise ValueError(f"modulus has {n.bit_length()} bits, more than {MAX_KEY_BITS}")
        if gmpy2.is_square(n):
            raise ValueError("a Paillier modulus cannot be a perfect square (p == q)")
        nsq = n * n
        setattr_ = object.__setattr__
        setattr_(self, "n", n)
        setattr_(self, "nsquare", nsq)
        setattr_(self, "bits", n.bit_length())
        digest = hashlib.sha256(_FINGERPRINT_DOMAIN + _canonical_n(n)).hexdigest()
        setattr_(self, "fingerprint", digest)
        setattr_(self, "ciphertext_bytes", (nsq.bit_length() + 7) // 8)
        setattr_(self, "_n", gmpy2.mpz(n))
        setattr_(self, "_nsq", gmpy2.mpz(nsq))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PaillierPublicKey) and other.n == self.n

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"PaillierPublicKey(bits={self.bits}, fingerprint={self.fingerprint[:16]}...)"


class PaillierPrivateKey:
    """The key holder's secret: the primes ``p`` and ``q`` of ``n``.

    Decryption uses the Chinese remainder theorem (about 3-4x faster than
    decrypting modulo ``n^2`` directly). Never ship this object, its file or
    its primes to a device or to the aggregator.
    """

    __slots__ = ("_hp", "_hq", "_p", "_p_inv_q", "_psq", "_q", "_qsq", "public_key")

    def __init__(self, public_key: PaillierPublicKey, p: int, q: int) -> None:
        """Build the private key and its CRT constants.

        Args:
            public_key: the matching public key.
            p: one prime factor of ``public_key.n``.
            q: the other prime factor.

        Raises:
            ValueError: ``p * q != n`` or ``p == q``.
        """
        p, q = int(p), int(q)
        if p * q != public_key.n:
            raise ValueError("p * q does not equal the public key's modulus")
        if p == q:
            raise ValueError("p and q must be distinct")
        if p > q:
            p, q = q, p
        self.public_key = public_key
        self._p = gmpy2.mpz(p)
        self._q = gmpy2.mpz(q)
        self._psq = self._p * self._p
        self._qsq = self._q * self._q
        self._p_inv_q = gmpy2.invert(self._p, self._q)
        self._hp = self._h(self._p, self._psq)
        self._hq = self._h(self._q, self._qsq)

    def _h(self, x: Any, xsq: Any) -> Any:
        # h(x) = L_x(g^(x-1) mod x^2)^-1 mod x, with g = n + 1.
        g = self.public_key._n + 1
        lx = (gmpy2.powmod(g, x - 1, xsq) - 1) // x
        return gmpy2.invert(lx, x)

    @property
    def p(self) -> int:
        """The smaller prime factor of ``n``."""
        return int(self._p)

    @property
    def q(self) -> int:
        """The larger prime factor of ``n``."""
        return int(self._q)

    def raw_decrypt(self, ciphertext: int) -> int:
        """Decrypt one ciphertext to its plaintext in ``[0, n)`` by CRT.

        The caller must have validated the ciphertext (``0 < c < n^2``); see
        :class:`edge_sdk.crypto.CiphertextVector`, which does.

        Args:
            ciphertext: an integer ciphertext.

        Returns:
            The plaintext ``m`` with ``0 <= m < n``.
        """
        c = gmpy2.mpz(ciphertext)
        p, q = self._p, self._q
        mp = (gmpy2.powmod(c, p - 1, self._psq) - 1) // p * self._hp % p
        mq = (gmpy2.powmod(c, q - 1, self._qsq) - 1) // q * self._hq % q
        # Garner's CRT recombination: m = mp + p * ((mq - mp) * p^-1 mod q).
        return int(mp + p * ((mq - mp) * self._p_inv_q % q))

    def __repr__(self) -> str:
        return f"PaillierPrivateKey(<secret>, public_key={self.public_key!r})"


def generate_keypair(
    bits: int = 2048, *, allow_insecure_size: bool = False
) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """Generate a fresh Paillier key pair.

    Args:
        bits: modulus size; 2048 (default), 3072 or 4096.
        allow_insecure_size: accept smaller sizes (>= 128 bits). Only for
            tests and benchmarks: such keys can be factored.

    Returns:
        ``(public_key, private_key)``.

    Raises:
        ValueError: unsupported size.
    """
    if allow_insecure_size:
        if not 128 <= bits <= MAX_KEY_BITS or bits % 2:
            raise ValueError(f"key bits must be even and in [128, {MAX_KEY_BITS}], got {bits}")
    elif bits not in ALLOWED_KEY_BITS:
        raise ValueError(f"key bits must be one of {ALLOWED_KEY_BITS}, got {bits}")
    from phe import paillier

    phe_pub, phe_priv = paillier.generate_paillier_keypair(n_length=bits)
    public_key = PaillierPublicKey(n=int(phe_pub.n))
    return public_key, PaillierPrivateKey(public_key, int(phe_priv.p), int(phe_priv.q))


def public_key_to_bytes(public_key: PaillierPublicKey) -> bytes:
    """Canonical bytes of a public key for messages: version, length, ``n``.

    Layout: 1 byte version (1), 2 bytes big-endian length L of ``n`` in bytes,
    then L bytes of ``n`` big-endian with no leading zero byte.
    """
    raw = _n_bytes(public_key.n)
    return struct.pack(">BH", _PUBLIC_KEY_VERSION, len(raw)) + raw


def public_key_from_bytes(blob: bytes, *, min_bits: int = MIN_KEY_BITS) -> PaillierPublicKey:
    """Decode and validate :func:`public_key_to_bytes` output.

    Args:
        blob: the encoded key.
        min_bits: reject moduli smaller than this (default 2048).

    Returns:
        The public key.

    Raises:
        DecodeError: wrong version, length, non-canonical or invalid modulus.
    """
    blob = bytes(blob)
    if len(blob) < 3:
        raise DecodeError(f"public key blob too short ({len(blob)} bytes)")
    version, length = struct.unpack(">BH", blob[:3])
    if version != _PUBLIC_KEY_VERSION:
        raise DecodeError(f"unsupported public key encoding version {version}")
    if len(blob) != 3 + length:
        raise DecodeError(f"public key blob is {len(blob)} bytes, header says {3 + length}")
    raw = blob[3:]
    if not raw or raw[0] == 0:
        raise DecodeError("public key modulus is empty or has a leading zero byte")
    n = int.from_bytes(raw, "big")
    if n.bit_length() < min_bits:
        raise DecodeError(f"public key modulus has {n.bit_length()} bits, minimum is {min_bits}")
    try:
        return PaillierPublicKey(n=n)
    except ValueError as exc:
        raise DecodeError(f"invalid public key: {exc}") from exc
