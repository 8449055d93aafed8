"""Packing spec and codec: many small integers per Paillier plaintext.

A Paillier plaintext has ``bits(n) - 1`` usable bits; a quantized model weight
needs ``value_bits``. The codec puts ``k`` slots of ``w = value_bits +
headroom_bits`` bits into one plaintext, slot 0 in the least significant bits::

    m = sum_{i < k} u_i * 2^(w*i),   u_i = v_i + offset in [0, 2^value_bits)

``headroom_bits = ceil(log2(max_contributors + 1))`` guarantees that the sum of
up to ``max_contributors`` such plaintexts never carries from one slot into the
next, so adding ciphertexts adds every slot independently. See docs/packing.md
for the full layout.

The device pipeline is ``quantize -> (+ integer DP noise) -> clamp -> pack``;
each step is a separate function so the privacy module can add its noise to
the integers. Threat model: :func:`pack` refuses values outside the spec's
range, but a malicious device can encrypt any plaintext it likes; the key
holder's :func:`unpack_sum` checks every slot sum against what ``count``
honest contributions can reach and raises :class:`SlotOverflowError` naming
the slots. A carry out of a slot (which honest inputs can never produce) can
hide such an attack from the check; see docs/packing.md, "Limits".

Compatibility rule: fields of :class:`PackingSpec` are never removed; new ones
are optional with a default that reproduces the old behaviour, and bump
``SPEC_VERSION`` only when the byte layout changes.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.crypto.keys import PaillierPublicKey
from edge_sdk.errors import DecodeError, SlotOverflowError
from edge_sdk.protocol.limits import MAX_SLOT_BITS
from edge_sdk.randomness import RandomSource, default_random, uniform_uint64

__all__ = [
    "EXTRA_SPEC_VERSION",
    "MAX_EXTRA_SLOTS",
    "SPEC_VERSION",
    "ExtraSlot",
    "PackingSpec",
    "clamp",
    "dequantize",
    "pack",
    "quantize",
    "unpack_sum",
]

SPEC_VERSION = 1
#: Layout version of a spec that carries extra slots (version 1 bytes are unchanged).
EXTRA_SPEC_VERSION = 2
#: Most extra slots one spec may declare.
MAX_EXTRA_SLOTS = 16
_SPEC_MAGIC = b"EFPS"
# name length (then name), flags, bound, scale, sigma2 numerator, sigma2 denominator
_EXTRA_STRUCT = struct.Struct(">BQdQI")
_EXTRA_SIGNED = 1
_EXTRA_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
# magic, version, key_bits, value_bits, headroom_bits, slots, max_contributors, offset, scale
_SPEC_STRUCT = struct.Struct(">4sBHBBHIQd")
_FINGERPRINT_HEX = 64
#: Largest slot width: slot sums are handled as uint64 / int64 in numpy.
MAX_VALUE_BITS = 48
# |value * scale| must stay well inside int64 before clamping.
_QUANT_LIMIT = float(2**62)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtraSlot:
    """One integer slot packed after the model parameters (docs/packing.md, "Extra slots").

    A device puts ``q = round(x * scale)`` of some per-device quantity ``x``
    here (an example count, a loss sum, a clipped-or-not bit), bounds it to
    ``[0, bound]`` (``[-bound, bound]`` when ``signed``) ON THE DEVICE, adds
    exact discrete Gaussian noise of variance parameter ``sigma2_num /
    sigma2_den`` and clamps to the slot range like every other slot.
    ``bound`` is therefore the L2 sensitivity of the slot's sum (one device
    added or removed moves it by at most ``bound``); the device's accountant
    charges the slot with it (``2 * bound`` for a signed slot's local
    curve, where one device's value may change sign).

    Attributes:
        name: what the slot carries (lowercase letters, digits, ``_``).
        bound: largest value one device may put in the slot (``>= 1``).
        scale: slot units per 1.0 of the quantity (1.0 for counts).
        sigma2_num: numerator of the per-device noise variance (0: no noise,
            only for rounds without DP).
        sigma2_den: its denominator, a power of two.
        signed: values range over ``[-bound, bound]`` instead of ``[0, bound]``.
    """

    name: str
    bound: int
    scale: float = 1.0
    sigma2_num: int = 0
    sigma2_den: int = 1
    signed: bool = False

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not 1 <= len(self.name) <= 32
            or not set(self.name) <= _EXTRA_NAME_CHARS
        ):
            raise ValueError(f"extra slot name must be 1-32 of [a-z0-9_], got {self.name!r}")
        for name in ("bound", "sigma2_num", "sigma2_den"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"extra slot {name} must be an int, got {value!r}")
        if not 1 <= self.bound < 2**47:
            raise ValueError(f"extra slot bound must be in [1, 2^47), got {self.bound}")
        if not isinstance(self.scale, float) or not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"extra slot scale must be a finite float > 0, got {self.scale!r}")
        if not 0 <= self.sigma2_num < 2**63:
            raise ValueError(f"extra slot sigma2_num must be in [0, 2^63), got {self.sigma2_num}")
        den = self.sigma2_den
        if not 1 <= den < 2**32 or den & (den - 1):
            raise ValueError(f"extra slot sigma2_den must be a power of two, got {den}")
        if self.sigma2_num == 0 and den != 1:
            raise ValueError("a noiseless extra slot has sigma2 0/1")
        if self.sigma2_num and math.gcd(self.sigma2_num, den) != 1:
            raise ValueError("extra slot sigma2_num/sigma2_den must be in lowest terms")
        if not isinstance(self.signed, bool):
            raise TypeError(f"extra slot signed must be a bool, got {self.signed!r}")

    @property
    def low(self) -> int:
        """Smallest value one device may put in the slot."""
        return -self.bound if self.signed else 0

    @property
    def noised(self) -> bool:
        """Whether the device adds noise to this slot."""
        return self.sigma2_num > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {
            "name": self.name,
            "bound": self.bound,
            "scale": self.scale,
            "sigma2_num": self.sigma2_num,
            "sigma2_den": self.sigma2_den,
            "signed": self.signed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtraSlot:
        """Decode :meth:`to_dict` output (ValueError/TypeError on anything else)."""
        if not isinstance(data, Mapping) or set(data) != {
            "name",
            "bound",
            "scale",
            "sigma2_num",
            "sigma2_den",
            "signed",
        }:
            raise ValueError(f"malformed extra slot {data!r}")
        scale = data["scale"]
        if isinstance(scale, int) and not isinstance(scale, bool):
            scale = float(scale)
        return cls(
            name=data["name"],
            bound=data["bound"],
            scale=scale,
            sigma2_num=data["sigma2_num"],
            sigma2_den=data["sigma2_den"],
            signed=data["signed"],
        )


def _headroom_bits(max_contributors: int) -> int:
    # ceil(log2(max_contributors + 1)) computed exactly on integers.
    return int(max_contributors).bit_length()


@dataclass(frozen=True, slots=True, kw_only=True)
class PackingSpec:
    """How one device vector maps to Paillier plaintexts; peers must agree on it.

    Build it with :meth:`derive`; the constructor re-checks every derived field,
    so a spec decoded from the wire that is inconsistent is rejected.

    Attributes:
        key_bits: ``n.bit_length()`` of the federation's Paillier key.
        key_fingerprint: hex SHA-256 fingerprint of that key.
        value_bits: ``b``, bits of one offset (unsigned) value.
        headroom_bits: ``h = ceil(log2(max_contributors + 1))``.
        slots_per_plaintext: ``k = floor((key_bits - 1) / (b + h))``.
        offset: ``2^(b-1)``; a signed value ``v`` is stored as ``v + offset``.
        scale: quantization units per 1.0 (a weight ``x`` becomes ``x * scale``).
        max_contributors: most contributions one sum may hold.
        extras: extra integer slots packed after the model parameters, in
            order (empty: the version 1 layout, byte for byte).
    """

    key_bits: int
    key_fingerprint: str
    value_bits: int
    headroom_bits: int
    slots_per_plaintext: int
    offset: int
    scale: float
    max_contributors: int
    extras: tuple[ExtraSlot, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "key_bits",
            "value_bits",
            "headroom_bits",
            "slots_per_plaintext",
            "offset",
            "max_contributors",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not isinstance(self.scale, float) or isinstance(self.scale, bool):
            raise TypeError(f"scale must be a float, got {self.scale!r}")
        if not 2 <= self.value_bits <= MAX_VALUE_BITS:
            raise ValueError(f"value_bits must be in [2, {MAX_VALUE_BITS}], got {self.value_bits}")
        if not 1 <= self.max_contributors < 2**32:
            raise ValueError(f"max_contributors must be in [1, 2^32), got {self.max_contributors}")
        want_h = _headroom_bits(self.max_contributors)
        if self.headroom_bits != want_h:
            raise ValueError(
                f"headroom_bits must be ceil(log2(max_contributors + 1)) = {want_h} "
                f"for max_contributors={self.max_contributors}, got {self.headroom_bits}"
            )
        width = self.value_bits + self.headroom_bits
        if width > MAX_SLOT_BITS:
            raise ValueError(
                f"slot width value_bits + headroom_bits = {width} exceeds {MAX_SLOT_BITS}"
            )
        if not 16 <= self.key_bits <= 65535:
            raise ValueError(f"key_bits must be in [16, 65535], got {self.key_bits}")
        want_k = (self.key_bits - 1) // width
        if want_k < 1:
            raise ValueError(f"key_bits={self.key_bits} leaves no room for one {width}-bit slot")
        if self.slots_per_plaintext != want_k:
            raise ValueError(
                f"slots_per_plaintext must be floor((key_bits - 1) / {width}) = {want_k}, "
                f"got {self.slots_per_plaintext}"
            )
        want_offset = 1 << (self.value_bits - 1)
        if self.offset != want_offset:
            raise ValueError(f"offset must be 2^(value_bits-1) = {want_offset}, got {self.offset}")
        if not (math.isfinite(self.scale) and self.scale > 0.0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        fp = self.key_fingerprint
        if (
            not isinstance(fp, str)
            or len(fp) != _FINGERPRINT_HEX
            or fp.lower() != fp
            or any(ch not in "0123456789abcdef" for ch in fp)
        ):
            raise ValueError(f"key_fingerprint must be 64 lowercase hex digits, got {fp!r}")
        if not isinstance(self.extras, tuple) or not all(
            isinstance(e, ExtraSlot) for e in self.extras
        ):
            raise TypeError("extras must be a tuple of ExtraSlot")
        if len(self.extras) > MAX_EXTRA_SLOTS:
            raise ValueError(f"at most {MAX_EXTRA_SLOTS} extra slots, got {len(self.extras)}")
        names = [e.name for e in self.extras]
        if len(set(names)) != len(names):
            raise ValueError(f"extra slot names must be distinct, got {names}")
        for extra in self.extras:
            if extra.bound > self.value_max or extra.low < self.value_min:
                raise ValueError(
                    f"extra slot {extra.name!r} bound {extra.bound} exceeds the slot range "
                    f"(value_max {self.value_max})"
                )

    def with_extras(self, extras: Sequence[ExtraSlot]) -> PackingSpec:
        """This spec with ``extras`` packed after the model parameters."""
        return PackingSpec(
            key_bits=self.key_bits,
            key_fingerprint=self.key_fingerprint,
            value_bits=self.value_bits,
            headroom_bits=self.headroom_bits,
            slots_per_plaintext=self.slots_per_plaintext,
            offset=self.offset,
            scale=self.scale,
            max_contributors=self.max_contributors,
            extras=tuple(extras),
        )

    def extra_index(self, name: str) -> int | None:
        """Position of the extra slot ``name`` among the extras, or None."""
        for index, extra in enumerate(self.extras):
            if extra.name == name:
                return index
        return None

    @classmethod
    def derive(
        cls,
        public_key: PaillierPublicKey | None = None,
        max_contributors: int = 1000,
        value_bits: int = 16,
        scale: float | None = None,
        *,
        key_bits: int | None = None,
        key_fingerprint: str | None = None,
    ) -> PackingSpec:
        """Derive the spec for a key, a fleet size bound and a value width.

        Args:
            public_key: the federation's key (or give ``key_bits`` and
                ``key_fingerprint``).
            max_contributors: most contributions one aggregate may hold.
            value_bits: bits per offset value (16 by default).
            scale: quantization units per 1.0; default ``2^(value_bits - 3)``,
                i.e. a representable range of [-4, 4) per coordinate.
            key_bits: modulus bits, when no ``public_key`` is given.
            key_fingerprint: key fingerprint, when no ``public_key`` is given.

        Returns:
            The validated spec.

        Raises:
            ValueError: an argument is out of range (the message names it).
        """
        if public_key is not None:
            if key_bits is not None and key_bits != public_key.bits:
                raise ValueError(f"key_bits={key_bits} contradicts the key ({public_key.bits})")
            key_bits = public_key.bits
            key_fingerprint = public_key.fingerprint
        if key_bits is None or key_fingerprint is None:
            raise ValueError("give a public_key, or both key_bits and key_fingerprint")
        if isinstance(value_bits, bool) or not isinstance(value_bits, int):
            raise TypeError(f"value_bits must be an int, got {value_bits!r}")
        if not 2 <= value_bits <= MAX_VALUE_BITS:
            raise ValueError(f"value_bits must be in [2, {MAX_VALUE_BITS}], got {value_bits}")
        if isinstance(max_contributors, bool) or not isinstance(max_contributors, int):
            raise TypeError(f"max_contributors must be an int, got {max_contributors!r}")
        if not 1 <= max_contributors < 2**32:
            raise ValueError(f"max_contributors must be in [1, 2^32), got {max_contributors}")
        h = _headroom_bits(max_contributors)
        width = value_bits + h
        if width > MAX_SLOT_BITS:
            raise ValueError(
                f"value_bits={value_bits} plus headroom {h} bits exceeds {MAX_SLOT_BITS}"
            )
        return cls(
            key_bits=key_bits,
            key_fingerprint=key_fingerprint,
            value_bits=value_bits,
            headroom_bits=h,
            slots_per_plaintext=max((key_bits - 1) // width, 0),
            offset=1 << (value_bits - 1),
            scale=float(2 ** (value_bits - 3)) if scale is None else float(scale),
            max_contributors=max_contributors,
        )

    @property
    def slot_bits(self) -> int:
        """Slot width ``w = value_bits + headroom_bits``."""
        return self.value_bits + self.headroom_bits

    @property
    def value_min(self) -> int:
        """Smallest signed integer one device may send (``-offset``)."""
        return -self.offset

    @property
    def value_max(self) -> int:
        """Largest signed integer one device may send (``offset - 1``)."""
        return self.offset - 1

    def num_plaintexts(self, length: int) -> int:
        """Number of plaintexts (and ciphertexts) for a vector of ``length`` values."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        return -(-length // self.slots_per_plaintext)

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-friendly dict (``extras`` only when there are some, version 2)."""
        out: dict[str, Any] = {
            "version": EXTRA_SPEC_VERSION if self.extras else SPEC_VERSION,
            "key_bits": self.key_bits,
            "key_fingerprint": self.key_fingerprint,
            "value_bits": self.value_bits,
            "headroom_bits": self.headroom_bits,
            "slots_per_plaintext": self.slots_per_plaintext,
            "offset": self.offset,
            "scale": self.scale,
            "max_contributors": self.max_contributors,
        }
        if self.extras:
            out["extras"] = [e.to_dict() for e in self.extras]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PackingSpec:
        """Decode :meth:`to_dict` output, validating every field.

        Raises:
            DecodeError: unknown version, missing/unknown keys, or invalid values.
        """
        if not isinstance(data, Mapping):
            raise DecodeError(f"packing spec must be a mapping, got {type(data).__name__}")
        version = data.get("version")
        if version not in (SPEC_VERSION, EXTRA_SPEC_VERSION):
            raise DecodeError(f"unsupported packing spec version {version!r}")
        fields = {
            "key_bits",
            "key_fingerprint",
            "value_bits",
            "headroom_bits",
            "slots_per_plaintext",
            "offset",
            "scale",
            "max_contributors",
        }
        if version == EXTRA_SPEC_VERSION:
            fields.add("extras")
        keys = set(data) - {"version"}
        if keys != fields:
            raise DecodeError(
                f"packing spec keys: missing {sorted(fields - keys)}, "
                f"unknown {sorted(keys - fields)}"
            )
        values = {name: data[name] for name in fields}
        if isinstance(values["scale"], int) and not isinstance(values["scale"], bool):
            values["scale"] = float(values["scale"])
        try:
            if "extras" in values:
                if not isinstance(values["extras"], list) or not values["extras"]:
                    raise ValueError("a version 2 spec lists at least one extra slot")
                values["extras"] = tuple(ExtraSlot.from_dict(e) for e in values["extras"])
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"invalid packing spec: {exc}") from exc

    def to_bytes(self) -> bytes:
        """Stable binary encoding (big-endian); the input of :meth:`digest`.

        Layout: ``b"EFPS"``, u8 version, u16 key_bits, u8 value_bits,
        u8 headroom_bits, u16 slots_per_plaintext, u32 max_contributors,
        u64 offset, IEEE-754 binary64 scale, 32 bytes key fingerprint (62
        bytes, version 1). With extra slots the version byte is 2 and a tail
        follows: u8 count, then per slot u8 name length, the name (ASCII),
        u8 flags (bit 0: signed), u64 bound, binary64 scale, u64 sigma2_num,
        u32 sigma2_den.
        """
        head = _SPEC_STRUCT.pack(
            _SPEC_MAGIC,
            EXTRA_SPEC_VERSION if self.extras else SPEC_VERSION,
            self.key_bits,
            self.value_bits,
            self.headroom_bits,
            self.slots_per_plaintext,
            self.max_contributors,
            self.offset,
            self.scale,
        ) + bytes.fromhex(self.key_fingerprint)
        if not self.extras:
            return head
        tail = [bytes([len(self.extras)])]
        for e in self.extras:
            name = e.name.encode("ascii")
            tail.append(bytes([len(name)]) + name)
            flags = _EXTRA_SIGNED if e.signed else 0
            tail.append(_EXTRA_STRUCT.pack(flags, e.bound, e.scale, e.sigma2_num, e.sigma2_den))
        return head + b"".join(tail)

    @classmethod
    def from_bytes(cls, blob: bytes) -> PackingSpec:
        """Decode :meth:`to_bytes` output.

        Raises:
            DecodeError: wrong length, magic, version or inconsistent fields.
        """
        blob = bytes(blob)
        base = _SPEC_STRUCT.size + 32
        if len(blob) < base:
            raise DecodeError(f"packing spec must be at least {base} bytes, got {len(blob)}")
        magic, version, kb, vb, hb, k, mc, off, scale = _SPEC_STRUCT.unpack(
            blob[: _SPEC_STRUCT.size]
        )
        if magic != _SPEC_MAGIC:
            raise DecodeError("not a packing spec (bad magic)")
        if version not in (SPEC_VERSION, EXTRA_SPEC_VERSION):
            raise DecodeError(f"unsupported packing spec version {version}")
        if version == SPEC_VERSION and len(blob) != base:
            raise DecodeError(f"packing spec version 1 must be {base} bytes, got {len(blob)}")
        extras = _decode_extras(blob[base:]) if version == EXTRA_SPEC_VERSION else ()
        try:
            return cls(
                key_bits=kb,
                key_fingerprint=blob[_SPEC_STRUCT.size : base].hex(),
                value_bits=vb,
                headroom_bits=hb,
                slots_per_plaintext=k,
                offset=off,
                scale=scale,
                max_contributors=mc,
                extras=extras,
            )
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"invalid packing spec: {exc}") from exc

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes` (32 bytes): peers compare these."""
        return hashlib.sha256(self.to_bytes()).digest()


def _decode_extras(tail: bytes) -> tuple[ExtraSlot, ...]:
    """Decode the extra-slot tail of a version 2 spec (DecodeError on any defect)."""
    if not tail or not 1 <= tail[0] <= MAX_EXTRA_SLOTS:
        raise DecodeError("a version 2 packing spec needs 1 to 16 extra slots")
    count, pos, out = tail[0], 1, []
    for _ in range(count):
        if pos >= len(tail):
            raise DecodeError("truncated extra slot")
        size = tail[pos]
        name_end = pos + 1 + size
        end = name_end + _EXTRA_STRUCT.size
        if end > len(tail):
            raise DecodeError("truncated extra slot")
        try:
            name = tail[pos + 1 : name_end].decode("ascii")
            flags, bound, scale, num, den = _EXTRA_STRUCT.unpack(tail[name_end:end])
            if flags & ~_EXTRA_SIGNED:
                raise ValueError(f"unknown extra slot flags {flags:#x}")
            out.append(
                ExtraSlot(
                    name=name,
                    bound=bound,
                    scale=scale,
                    sigma2_num=num,
                    sigma2_den=den,
                    signed=bool(flags & _EXTRA_SIGNED),
                )
            )
        except (UnicodeDecodeError, TypeError, ValueError) as exc:
            raise DecodeError(f"invalid extra slot: {exc}") from None
        pos = end
    if pos != len(tail):
        raise DecodeError("trailing bytes after the extra slots")
    return tuple(out)


def quantize(
    values: npt.ArrayLike, spec: PackingSpec, rng: RandomSource | None = None
) -> npt.NDArray[np.int64]:
    """Scale floats to integers with unbiased stochastic rounding (no clamping).

    ``x = value * scale`` becomes ``floor(x) + 1`` with probability
    ``x - floor(x)`` and ``floor(x)`` otherwise, so ``E[q] = x`` exactly up to
    float rounding. The coin is ``u = (64-bit draw >> 11) / 2^53 < frac``.

    Args:
        values: 1-D float array.
        spec: the packing spec (its ``scale``).
        rng: randomness for the rounding (default: the OS CSPRNG). The rounding
            is part of the privacy story: never use a predictable source on a device.

    Returns:
        int64 array of the same length.

    Raises:
        ValueError: NaN/inf, or magnitudes beyond 2^62 after scaling.
    """
    source = default_random() if rng is None else rng
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {arr.shape}")
    scaled = arr * spec.scale
    if not np.all(np.isfinite(scaled)):
        bad = np.flatnonzero(~np.isfinite(scaled))[:10].tolist()
        raise ValueError(f"values must be finite after scaling; bad indices {bad}")
    if arr.size and float(np.max(np.abs(scaled))) >= _QUANT_LIMIT:
        raise ValueError(f"|value * scale| must be < 2^62, got {float(np.max(np.abs(scaled)))}")
    floor = np.floor(scaled)
    frac = scaled - floor
    coins = (uniform_uint64(source, arr.size) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return floor.astype(np.int64) + (coins < frac).astype(np.int64)


def clamp(ints: npt.ArrayLike, spec: PackingSpec) -> tuple[npt.NDArray[np.int64], int]:
    """Clamp integers to ``[value_min, value_max]``.

    Returns:
        ``(clamped, number_of_values_changed)``; the count is worth logging
        (clamping after noise biases the sum).
    """
    arr = np.asarray(ints)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"clamp needs an integer array, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    clamped = np.clip(arr, spec.value_min, spec.value_max)
    return clamped, int(np.count_nonzero(clamped != arr))


def _bits_to_uint64(bits: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint64]:
    """Rows of ``width`` little-endian bits -> uint64 values (vectorised)."""
    rows = bits.shape[0]
    padded = np.zeros((rows, 64), dtype=np.uint8)
    padded[:, :width] = bits
    return (
        np.packbits(padded, axis=1, bitorder="little")
        .view("<u8")
        .reshape(rows)
        .astype(np.uint64, copy=False)
    )


def pack(ints: npt.ArrayLike, spec: PackingSpec) -> list[int]:
    """Pack signed integers into Paillier plaintexts, ``k`` slots each.

    Every value is offset to ``u = v + offset`` and written little-endian
    (slot 0 lowest). Slots past the end of the vector in the last plaintext
    are zero.

    Args:
        ints: 1-D integer array, every value in ``[value_min, value_max]``.
        spec: the packing spec.

    Returns:
        ``spec.num_plaintexts(len(ints))`` Python ints, each ``< 2^(k*w)``.

    Raises:
        ValueError: a value lies outside the spec's range (clamp first).
    """
    arr = np.asarray(ints)
    if arr.ndim != 1:
        raise ValueError(f"ints must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"pack needs an integer array, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < spec.value_min or hi > spec.value_max:
            bad = np.flatnonzero((arr < spec.value_min) | (arr > spec.value_max))[:10].tolist()
            raise ValueError(
                f"values outside [{spec.value_min}, {spec.value_max}] at indices {bad} "
                f"(min {lo}, max {hi}); clamp before packing"
            )
    return _pack_unsigned((arr + spec.offset).astype(np.uint64), spec)


def _pack_unsigned(unsigned: npt.NDArray[np.uint64], spec: PackingSpec) -> list[int]:
    """Pack already-offset slot values without range checks (see ``_raw``)."""
    k, w = spec.slots_per_plaintext, spec.slot_bits
    count = spec.num_plaintexts(unsigned.size)
    if count == 0:
        return []
    slots = np.zeros(count * k, dtype="<u8")
    slots[: unsigned.size] = unsigned
    # Each slot value as 64 little-endian bits; keep the low w bits of each,
    # lay the slots end to end and regroup the bit stream into bytes.
    bits = np.unpackbits(slots.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    stream = bits[:, :w].reshape(count, k * w)
    packed = np.packbits(stream, axis=1, bitorder="little")
    raw = packed.tobytes()
    step = packed.shape[1]
    return [int.from_bytes(raw[i * step : (i + 1) * step], "little") for i in range(count)]


def _unpack_slots(
    plaintexts: Sequence[int], spec: PackingSpec
) -> tuple[npt.NDArray[np.uint64], list[int]]:
    """Split plaintexts into slot values; also return plaintexts with bits above k*w."""
    k, w = spec.slots_per_plaintext, spec.slot_bits
    count = len(plaintexts)
    nbytes = (spec.key_bits + 7) // 8
    used_bits = k * w
    high: list[int] = []
    chunks = []
    for index, m in enumerate(plaintexts):
        m = int(m)
        if m < 0 or m.bit_length() > nbytes * 8:
            raise ValueError(f"plaintext {index} is outside [0, 2^{nbytes * 8})")
        if m >> used_bits:
            high.append(index)
        chunks.append(m.to_bytes(nbytes, "little"))
    raw = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(count, nbytes)
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :used_bits]
    return _bits_to_uint64(bits.reshape(count * k, w), w), high


def unpack_sum(
    plaintexts: Sequence[int], spec: PackingSpec, *, count: int, length: int
) -> npt.NDArray[np.int64]:
    """Recover the signed sum of ``count`` contributions from decrypted plaintexts.

    Each slot holds ``S = sum_j (v_j + offset)``; the result is
    ``S - count * offset``. A slot is an overflow when ``S`` exceeds
    ``count * (2^value_bits - 1)``, the most ``count`` honest contributions can
    reach, when a padding slot past ``length`` is non-zero, or when a plaintext
    has bits set above its last slot.

    Args:
        plaintexts: decrypted sums, ``spec.num_plaintexts(length)`` of them.
        spec: the packing spec of every contribution.
        count: number of contributions summed (1..max_contributors).
        length: number of values per contribution.

    Returns:
        int64 array of ``length`` signed sums.

    Raises:
        SlotOverflowError: some slots are out of reach of ``count`` honest
            contributions; ``.slots`` lists their indices (indices >= length
            mean padding slots; a plaintext with high bits set is reported as
            its last slot).
        ValueError: ``count`` outside ``[1, max_contributors]``, or the number
            of plaintexts does not match ``length``.
    """
    if not 1 <= count <= spec.max_contributors:
        raise ValueError(
            f"count must be in [1, max_contributors={spec.max_contributors}], got {count}: "
            "the headroom cannot certify larger sums"
        )
    want = spec.num_plaintexts(length)
    if len(plaintexts) != want:
        raise ValueError(f"expected {want} plaintexts for length {length}, got {len(plaintexts)}")
    if want == 0:
        return np.zeros(0, dtype=np.int64)
    slots, high = _unpack_slots(plaintexts, spec)
    limit = np.uint64(count * ((1 << spec.value_bits) - 1))
    bad_mask = slots > limit
    bad_mask[length:] |= slots[length:] != 0
    k = spec.slots_per_plaintext
    for index in high:
        bad_mask[index * k + k - 1] = True
    if bad_mask.any():
        bad = tuple(int(i) for i in np.flatnonzero(bad_mask))
        shown = ", ".join(str(i) for i in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise SlotOverflowError(
            f"{len(bad)} slot sums exceed what {count} honest contributions can reach "
            f"(slots {shown})",
            slots=bad,
        )
    return slots[:length].astype(np.int64) - np.int64(count * spec.offset)


def dequantize(int_sum: npt.ArrayLike, spec: PackingSpec) -> npt.NDArray[np.float64]:
    """Divide integer sums by ``scale`` (the inverse of :func:`quantize`)."""
    return np.asarray(int_sum, dtype=np.float64) / spec.scale
