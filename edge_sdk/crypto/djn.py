"""Fast Paillier obfuscators in the Damgard-Jurik-Nielsen short-exponent form.

Plain Paillier spends one full ``r^n mod n^2`` (a ``key_bits``-bit exponent)
per ciphertext. Damgard, Jurik and Nielsen (DJN 2010, "A generalization of
Paillier's public-key system with applications to electronic voting", its
"faster variant") publish a base ``hs = h^n mod n^2`` once and
draw obfuscators as ``hs^a mod n^2`` with a *short* random exponent ``a`` of
about ``key_bits / 2`` bits. Because ``hs`` is fixed, a precomputed
fixed-base table turns each obfuscator into ~``bits(a) / window``
multiplications (about 20x cheaper than ``r^n`` at 2048 bits).

The resulting ciphertexts ``(1 + n*m) * hs^a mod n^2`` are ordinary Paillier
ciphertexts: ``hs^a = (h^a)^n`` is an n-th residue, so python-paillier's
``raw_decrypt`` and :func:`edge_sdk.crypto.decrypt` decrypt them and sums stay
bit-exact.

Parameters (as in Intel's Paillier Cryptosystem Library, where DJN is the
default, and in libdjn/ABY): ``h = -x^2 mod n`` for a random unit ``x``;
exponent length ``ceil(key_bits / 2)`` bits (1024 at 2048 bits, 1536 at 3072).

Why ``-x^2``: in DJN's setting (``p = q = 3 mod 4``, ``gcd(p-1, q-1) = 2``)
it makes ``<h>`` exactly the cyclic group of Jacobi-symbol-1 units, the group
in which their extra assumption is stated. For *hiding the plaintext* it is
not needed: ``c mod n = (h^(n*a)) mod n`` does not involve ``m`` at all, so a
Jacobi symbol or residuosity of ``h`` can only ever say something about ``a``.
What is needed is that ``h`` has large order and is not known to have a
special form, which a uniformly random unit (and ``-x^2`` for uniform ``x``)
has with overwhelming probability. edgefl keys come from python-paillier,
whose primes do not satisfy DJN's congruences, so ``-x^2`` buys no extra
structure here; it is kept because it costs nothing and keeps the base
literally the one the literature analyses. The committee publishes ``h``
beside ``hs`` so that anyone can check ``hs = h^n`` (i.e. that ``hs`` is an
n-th residue and decryption stays correct).

Security beyond DCR: that ``hs^a`` for a uniform ``ceil(key_bits/2)``-bit
``a`` is indistinguishable from a uniform element of ``<hs>`` (a
short-exponent indistinguishability assumption; DJN 2010, IPCL). The known
short-exponent attacks (van Oorschot-Wiener) need the group order, which is
secret here (it reveals the factors of ``n``); generic attacks cost about
``2^(bits(a)/2)`` (``2^512`` at 2048 bits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmpy2

from edge_sdk._fs import atomic_write
from edge_sdk.crypto._gmp import mpz_from_bytes
from edge_sdk.crypto.ciphertext import CiphertextVector
from edge_sdk.crypto.keys import PaillierPublicKey, _canonical_n
from edge_sdk.errors import CryptoError, DecodeError
from edge_sdk.randomness import RandomSource, default_random, randbelow

__all__ = [
    "DEFAULT_WINDOW",
    "DJNBase",
    "DJNObfuscatorSource",
    "DJNTableError",
    "FixedBaseTable",
    "default_exponent_bits",
    "encrypt_with",
    "load_or_build",
    "random_exponent",
    "table_for",
]

_log = logging.getLogger(__name__)

#: Bits per window of the fixed-base table (63 entries per window).
DEFAULT_WINDOW = 6
#: Table capacity beyond the obfuscator exponent: covers the binding proof's
#: exponents (``y`` and ``z2``: exponent + 64 + log2(count) + 128 + 80 bits).
PROOF_HEADROOM_BITS = 320

_BASE_DOMAIN = b"edgefl/djn-base/v1\x00"
_BASE_FORMAT = "edgefl-djn-base"
_BASE_VERSION = 1
_TABLE_MAGIC = b"EFDT"
_TABLE_VERSION = 1
# magic, version, window, reserved, element width, max_bits, key fingerprint, base digest
_TABLE_HEADER = struct.Struct(">4sBBBHI32s32s")


class DJNTableError(CryptoError):
    """A fixed-base table file is corrupt or belongs to another key or base."""

    reason = "djn_table"


def default_exponent_bits(key_bits: int) -> int:
    """Return the DJN/IPCL short-exponent length: ``ceil(key_bits / 2)``."""
    return (key_bits + 1) // 2


def random_exponent(bits: int, rng: RandomSource | None = None) -> int:
    """Return a uniform integer in ``[0, 2^bits)`` from ``rng`` (default: OS CSPRNG)."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    source = default_random() if rng is None else rng
    raw = int.from_bytes(source.random_bytes((bits + 7) // 8), "big")
    return raw & ((1 << bits) - 1)


@dataclass(frozen=True, slots=True)
class DJNBase:
    """The federation's public DJN base ``hs = h^n mod n^2``.

    The key-holder committee generates it at the key ceremony and signs it;
    devices and the aggregator load it with :meth:`from_json`.

    Attributes:
        n: the Paillier modulus it belongs to.
        hs: the base, a unit in ``(1, n^2)``.
        exponent_bits: length of the obfuscator exponents ``a``.
        digest: lowercase hex SHA-256 of a domain-separated encoding of
            ``(n, hs, exponent_bits)``; tables, pool segments and proofs name it.
        h: optionally the n-th root ``h`` (public in DJN); when present,
            ``hs == h^n mod n^2`` is checked, which proves ``hs`` is an n-th residue.
    """

    n: int
    hs: int
    exponent_bits: int
    digest: str = field(init=False)
    h: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n, hs, bits = int(self.n), int(self.hs), int(self.exponent_bits)
        if n < 15 or n % 2 == 0:
            raise ValueError("DJN base: n must be an odd modulus >= 15")
        nsq = n * n
        if not 1 < hs < nsq:
            raise ValueError("DJN base: hs must satisfy 1 < hs < n^2")
        if gmpy2.gcd(hs, n) != 1:
            raise ValueError("DJN base: hs is not a unit modulo n")
        if not default_exponent_bits(n.bit_length()) <= bits <= 2 * n.bit_length():
            raise ValueError(
                f"DJN base: exponent_bits must be in [{default_exponent_bits(n.bit_length())}, "
                f"{2 * n.bit_length()}] for a {n.bit_length()}-bit modulus, got {bits}"
            )
        if self.h is not None:
            h = int(self.h)
            if not 1 < h < n or gmpy2.gcd(h, n) != 1:
                raise ValueError("DJN base: h must be a unit in (1, n)")
            if int(gmpy2.powmod(h, n, nsq)) != hs:
                raise ValueError("DJN base: hs != h^n mod n^2")
            object.__setattr__(self, "h", h)
        width = (nsq.bit_length() + 7) // 8
        digest = hashlib.sha256(
            _BASE_DOMAIN + _canonical_n(n) + hs.to_bytes(width, "big") + struct.pack(">I", bits)
        ).hexdigest()
        setattr_ = object.__setattr__
        setattr_(self, "n", n)
        setattr_(self, "hs", hs)
        setattr_(self, "exponent_bits", bits)
        setattr_(self, "digest", digest)

    def __repr__(self) -> str:
        return (
            f"DJNBase(bits={self.n.bit_length()}, exponent_bits={self.exponent_bits}, "
            f"digest={self.digest[:16]}...)"
        )

    @classmethod
    def generate(
        cls,
        public_key: PaillierPublicKey,
        rng: RandomSource | None = None,
        *,
        exponent_bits: int | None = None,
    ) -> DJNBase:
        """Draw a fresh base: ``x`` a uniform unit, ``h = -x^2 mod n``, ``hs = h^n``.

        Args:
            public_key: the federation's key.
            rng: randomness for ``x`` (default: the OS CSPRNG).
            exponent_bits: obfuscator exponent length (default ``ceil(bits / 2)``).

        Returns:
            The base, with ``h`` recorded (it is public).
        """
        source = default_random() if rng is None else rng
        n = public_key.n
        while True:
            x = randbelow(source, n - 1) + 1
            if gmpy2.gcd(x, n) == 1:
                break
        h = (-x * x) % n
        hs = int(gmpy2.powmod(h, public_key._n, public_key._nsq))
        bits = default_exponent_bits(public_key.bits) if exponent_bits is None else exponent_bits
        return cls(n=n, hs=hs, exponent_bits=bits, h=h)

    def check_key(self, public_key: PaillierPublicKey) -> None:
        """Raise :class:`CryptoError` unless this base belongs to ``public_key``."""
        if public_key.n != self.n:
            raise CryptoError(
                f"DJN base {self.digest[:16]}... belongs to another public key, "
                f"not {public_key.fingerprint[:16]}..."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (integers as lowercase hex)."""
        out: dict[str, Any] = {
            "format": _BASE_FORMAT,
            "version": _BASE_VERSION,
            "n": format(self.n, "x"),
            "hs": format(self.hs, "x"),
            "exponent_bits": self.exponent_bits,
            "digest": self.digest,
        }
        if self.h is not None:
            out["h"] = format(self.h, "x")
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DJNBase:
        """Decode :meth:`to_dict` output; the stored digest must match.

        Raises:
            DecodeError: wrong format or version, unknown or missing fields, an
                invalid base, or a digest that does not match the fields.
        """
        required = {"format", "version", "n", "hs", "exponent_bits", "digest"}
        keys = set(data)
        if not required <= keys or not keys <= required | {"h"}:
            raise DecodeError(
                f"DJN base fields: expected {sorted(required)} (+ h), got {sorted(keys)}"
            )
        if data["format"] != _BASE_FORMAT or data["version"] != _BASE_VERSION:
            raise DecodeError("not a version-1 edgefl DJN base")
        try:
            bits = data["exponent_bits"]
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise DecodeError("exponent_bits must be an integer")
            h = data.get("h")
            base = cls(
                n=int(data["n"], 16),
                hs=int(data["hs"], 16),
                exponent_bits=bits,
                h=None if h is None else int(h, 16),
            )
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"invalid DJN base: {exc}") from exc
        if base.digest != data["digest"]:
            raise DecodeError("DJN base digest does not match its fields")
        return base

    @classmethod
    def from_json(cls, text: str | bytes) -> DJNBase:
        """Decode :meth:`to_json` output (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DecodeError(f"DJN base is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DecodeError("DJN base JSON must be an object")
        return cls.from_dict(data)


class FixedBaseTable:
    """Windowed fixed-base exponentiation: ``base^e mod m`` in ~``bits(e)/window`` mulmods.

    Row ``i`` holds ``base^(d * 2^(window*i))`` for ``d = 1 .. 2^window - 1``;
    ``base^e`` is the product of one entry per non-zero window digit of ``e``.
    Exponents longer than ``max_bits`` are handled (the excess costs one
    ordinary ``powmod``).

    Memory: ``ceil(max_bits / window) * (2^window - 1)`` entries of
    ``bytes(m)`` each (see :attr:`nbytes`).
    """

    __slots__ = ("_base", "_modulus", "_rows", "_top", "max_bits", "window")

    def __init__(
        self, base: int, modulus: int, *, max_bits: int, window: int = DEFAULT_WINDOW
    ) -> None:
        """Build the table (``rows * (2^window - 1)`` modular multiplications)."""
        if not 1 <= window <= 12:
            raise ValueError(f"window must be in [1, 12], got {window}")
        if max_bits < 1:
            raise ValueError(f"max_bits must be >= 1, got {max_bits}")
        self.window = window
        self.max_bits = max_bits
        self._modulus = gmpy2.mpz(modulus)
        self._base = gmpy2.mpz(base) % self._modulus
        rows_count = -(-max_bits // window)
        m = self._modulus
        rows: list[list[Any]] = []
        row_base = self._base
        for _ in range(rows_count):
            row = [row_base]
            acc = row_base
            for _ in range((1 << window) - 2):
                acc = acc * row_base % m
                row.append(acc)
            rows.append(row)
            row_base = acc * row_base % m  # base^(2^window * 2^(window*i))
        self._rows = rows
        self._top = row_base  # base^(2^(window*rows))

    @classmethod
    def _from_rows(
        cls, base: Any, modulus: Any, rows: list[list[Any]], window: int, max_bits: int
    ) -> FixedBaseTable:
        obj = cls.__new__(cls)
        obj.window = window
        obj.max_bits = max_bits
        obj._modulus = modulus
        obj._base = base
        obj._rows = rows
        obj._top = rows[-1][-1] * rows[-1][0] % modulus
        return obj

    @property
    def base(self) -> int:
        """The fixed base."""
        return int(self._base)

    @property
    def modulus(self) -> int:
        """The modulus."""
        return int(self._modulus)

    @property
    def entries(self) -> int:
        """Number of stored elements."""
        return len(self._rows) * ((1 << self.window) - 1)

    @property
    def nbytes(self) -> int:
        """Payload size of the table: entries times the modulus byte length."""
        return self.entries * ((int(self._modulus).bit_length() + 7) // 8)

    def pow(self, exponent: int) -> Any:
        """Return ``base^exponent mod modulus`` (gmpy2 ``mpz``) for ``exponent >= 0``."""
        if exponent < 0:
            raise ValueError("exponent must be >= 0")
        e = int(exponent)
        w = self.window
        mask = (1 << w) - 1
        m = self._modulus
        acc: Any = None
        rows = self._rows
        capacity = len(rows) * w
        high = e >> capacity
        e &= (1 << capacity) - 1
        i = 0
        while e:
            d = e & mask
            if d:
                entry = rows[i][d - 1]
                acc = entry if acc is None else acc * entry % m
            e >>= w
            i += 1
        if high:
            extra = gmpy2.powmod(self._top, high, m)
            acc = extra if acc is None else acc * extra % m
        return gmpy2.mpz(1) if acc is None else acc

    # -- persistence ---------------------------------------------------------------

    def save(
        self, path: str | os.PathLike[str], *, public_key: PaillierPublicKey, base: DJNBase
    ) -> None:
        """Write the table atomically: header (key fingerprint, base digest), entries, SHA-256.

        Raises:
            CryptoError: the table is not the one for ``(public_key, base)``.
        """
        _check_table_identity(self, public_key, base)
        width = public_key.ciphertext_bytes
        header = _TABLE_HEADER.pack(
            _TABLE_MAGIC,
            _TABLE_VERSION,
            self.window,
            0,
            width,
            self.max_bits,
            bytes.fromhex(public_key.fingerprint),
            bytes.fromhex(base.digest),
        )
        body = b"".join(int(v).to_bytes(width, "big") for row in self._rows for v in row)
        payload = header + body
        payload += hashlib.sha256(payload).digest()
        atomic_write(Path(path), payload, mode=0o644)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, public_key: PaillierPublicKey, base: DJNBase
    ) -> FixedBaseTable:
        """Read a table written by :meth:`save` for exactly ``(public_key, base)``.

        Raises:
            DJNTableError: another key or base (never used), bad checksum,
                bad header or size, or a first entry that is not ``hs``.
            FileNotFoundError: no such file.
        """
        base.check_key(public_key)
        data = Path(path).read_bytes()
        name = Path(path).name
        if len(data) < _TABLE_HEADER.size + 32:
            raise DJNTableError(f"DJN table {name} is truncated")
        if hashlib.sha256(data[:-32]).digest() != data[-32:]:
            raise DJNTableError(f"DJN table {name} fails its checksum")
        magic, version, window, _res, width, max_bits, fingerprint, digest = _TABLE_HEADER.unpack(
            data[: _TABLE_HEADER.size]
        )
        if magic != _TABLE_MAGIC or version != _TABLE_VERSION:
            raise DJNTableError(f"DJN table {name} is not a version-1 table file")
        if fingerprint.hex() != public_key.fingerprint:
            raise DJNTableError(
                f"DJN table {name} was built for key {fingerprint.hex()[:16]}..., "
                f"not {public_key.fingerprint[:16]}...; refusing to use it"
            )
        if digest.hex() != base.digest:
            raise DJNTableError(
                f"DJN table {name} was built for base {digest.hex()[:16]}..., "
                f"not {base.digest[:16]}...; refusing to use it"
            )
        if width != public_key.ciphertext_bytes or not 1 <= window <= 12 or max_bits < 1:
            raise DJNTableError(f"DJN table {name} has an invalid header")
        per_row = (1 << window) - 1
        rows_count = -(-max_bits // window)
        body = data[_TABLE_HEADER.size : -32]
        if len(body) != rows_count * per_row * width:
            raise DJNTableError(f"DJN table {name} has the wrong size")
        frm = mpz_from_bytes
        values = [frm(body[i : i + width], "big") for i in range(0, len(body), width)]
        modulus = public_key._nsq
        if values[0] != base.hs or any(not 0 < v < modulus for v in values):
            raise DJNTableError(f"DJN table {name} holds values that are not powers of hs")
        rows = [values[r * per_row : (r + 1) * per_row] for r in range(rows_count)]
        return cls._from_rows(gmpy2.mpz(base.hs), modulus, rows, window, max_bits)


def _check_table_identity(
    table: FixedBaseTable, public_key: PaillierPublicKey, base: DJNBase
) -> None:
    base.check_key(public_key)
    if table.modulus != public_key.nsquare or table.base != base.hs:
        raise CryptoError("fixed-base table is not the table of this key's DJN base")


def _build(public_key: PaillierPublicKey, base: DJNBase, window: int) -> FixedBaseTable:
    return FixedBaseTable(
        base.hs,
        public_key.nsquare,
        max_bits=base.exponent_bits + PROOF_HEADROOM_BITS,
        window=window,
    )


def load_or_build(
    path: str | os.PathLike[str],
    public_key: PaillierPublicKey,
    base: DJNBase,
    *,
    window: int = DEFAULT_WINDOW,
) -> FixedBaseTable:
    """Load the table at ``path``; rebuild and save it when missing, stale or corrupt.

    A file for another key or base, or one failing its checksum, is never
    used: it is replaced by a freshly built table (logged at WARNING).
    """
    try:
        table = FixedBaseTable.load(path, public_key=public_key, base=base)
        if table.window == window and table.max_bits >= base.exponent_bits + PROOF_HEADROOM_BITS:
            return table
    except FileNotFoundError:
        pass
    except DJNTableError as exc:
        _log.warning("rebuilding DJN table: %s", exc)
    table = _build(public_key, base, window)
    table.save(path, public_key=public_key, base=base)
    return table


_TABLES: dict[tuple[str, str, int], FixedBaseTable] = {}
_TABLES_LOCK = threading.Lock()


def table_for(
    public_key: PaillierPublicKey,
    base: DJNBase,
    *,
    path: str | os.PathLike[str] | None = None,
    window: int = DEFAULT_WINDOW,
) -> FixedBaseTable:
    """Return this process's table for ``(public_key, base)``, built or loaded once.

    Args:
        public_key: the federation's key.
        base: its DJN base.
        path: persist the table here (see :func:`load_or_build`); default: memory only.
        window: window bits.
    """
    base.check_key(public_key)
    key = (public_key.fingerprint, base.digest, window)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            table = (
                _build(public_key, base, window)
                if path is None
                else load_or_build(path, public_key, base, window=window)
            )
            _TABLES[key] = table
        return table


class DJNObfuscatorSource:
    """Draws DJN obfuscators ``hs^a mod n^2`` together with their secret exponents ``a``.

    Args:
        public_key: the federation's key.
        base: its DJN base (checked to belong to ``public_key``).
        table: a prebuilt table for ``base`` (default: :func:`table_for`).
        table_path: persist/load the table here when ``table`` is not given.
        window: window bits of a table built here.

    Raises:
        CryptoError: the base or the table belongs to another key or base.
    """

    def __init__(
        self,
        public_key: PaillierPublicKey,
        base: DJNBase,
        *,
        table: FixedBaseTable | None = None,
        table_path: str | os.PathLike[str] | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        """Attach the table (building or loading it when needed)."""
        base.check_key(public_key)
        if table is None:
            table = table_for(public_key, base, path=table_path, window=window)
        _check_table_identity(table, public_key, base)
        self.public_key = public_key
        self.base = base
        self.table = table

    def __repr__(self) -> str:
        return f"DJNObfuscatorSource(base={self.base.digest[:16]}..., key={self.public_key!r})"

    def obfuscator(self, exponent: int) -> Any:
        """Return ``hs^exponent mod n^2`` (gmpy2 ``mpz``) from the table."""
        return self.table.pow(exponent)

    def draw(self, rng: RandomSource | None = None) -> tuple[Any, int]:
        """Return one fresh ``(hs^a mod n^2, a)`` with ``a`` uniform in ``[0, 2^exponent_bits)``."""
        a = random_exponent(self.base.exponent_bits, rng)
        return self.table.pow(a), a

    def draw_many(self, count: int, rng: RandomSource | None = None) -> list[tuple[Any, int]]:
        """Return ``count`` fresh ``(obfuscator, exponent)`` pairs."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        source = default_random() if rng is None else rng
        return [self.draw(source) for _ in range(count)]

    def encrypt(
        self, plaintexts: Sequence[int], rng: RandomSource | None = None
    ) -> tuple[CiphertextVector, list[int]]:
        """Encrypt packed plaintexts with fresh DJN obfuscators.

        Returns:
            The ciphertext vector and the secret exponents (one per ciphertext;
            needed by :func:`edge_sdk.crypto.binding.prove`, secret like the
            obfuscators).

        Raises:
            ValueError: a plaintext is outside ``[0, n)``.
        """
        pairs = self.draw_many(len(plaintexts), rng)
        return encrypt_with(self.public_key, plaintexts, pairs), [a for _, a in pairs]


def encrypt_with(
    public_key: PaillierPublicKey, plaintexts: Sequence[int], pairs: Sequence[tuple[Any, int]]
) -> CiphertextVector:
    """Encrypt ``plaintexts[j]`` with obfuscator ``pairs[j][0]`` (each used once, by the caller).

    Raises:
        ValueError: a plaintext outside ``[0, n)`` or a length mismatch.
    """
    n = public_key.n
    if len(plaintexts) != len(pairs):
        raise ValueError(f"{len(plaintexts)} plaintexts but {len(pairs)} obfuscators")
    for index, m in enumerate(plaintexts):
        if not 0 <= m < n:
            raise ValueError(f"plaintext {index} is outside [0, n)")
    mn, nsq = public_key._n, public_key._nsq
    values = tuple((mn * m + 1) * obf % nsq for m, (obf, _) in zip(plaintexts, pairs, strict=True))
    return CiphertextVector._trusted(public_key, values)
