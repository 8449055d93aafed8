"""Field rules and the canonical msgpack codec behind every wire message.

Wire form of every message (schema version 2)::

    msgpack array [version: int, kind: str, body: map, check: bin(8)]

``body`` maps field names to values in the order the message type declares
them; ``check`` is the first 8 bytes of SHA-256 over the msgpack encoding of
``[version, kind, body]``. The check is not a security measure (signatures
are); it makes every single-byte corruption of a payload detectable, even in
unsigned messages, and decoding also insists that the payload is exactly the
canonical encoding of the message it decodes to, so there is one byte string
per message: what is signed is what is sent.

Decoding never trusts the wire: a size bound comes first, msgpack's own
length limits are set from the payload size, ext types are refused, the kind
is looked up in a closed table (nothing named by wire data is imported), and
every field is checked against its rule.
"""

from __future__ import annotations

import abc
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import msgpack

from edge_sdk.errors import DecodeError
from edge_sdk.ids import ID_PATTERN

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_VERSIONS",
    "BytesRule",
    "IntRule",
    "Message",
    "PairsRule",
    "Rule",
    "StrRule",
    "StrTupleRule",
    "decode_any",
    "encode",
]

SCHEMA_VERSION = 2
#: Schema 1 (no binding proofs, a single key holder returning plaintext sums)
#: is not accepted: its guarantees are weaker than schema 2 promises.
SUPPORTED_VERSIONS = frozenset({2})
CHECK_LEN = 8
MAX_DEPTH = 4


class Rule(abc.ABC):
    """How one field is bounded; ``check`` raises ValueError/TypeError naming it."""

    __slots__ = ()

    @abc.abstractmethod
    def check(self, name: str, value: Any) -> None:
        """Validate ``value`` for field ``name``."""


@dataclass(frozen=True, slots=True)
class IntRule(Rule):
    """An integer in [lo, hi] (bool is refused)."""

    lo: int = 0
    hi: int = 2**63 - 1

    def check(self, name: str, value: Any) -> None:
        """Validate an integer field."""
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{name} must be in [{self.lo}, {self.hi}], got {value}")


@dataclass(frozen=True, slots=True)
class StrRule(Rule):
    """A str of at most ``max_len`` characters, optionally matching ``pattern``."""

    max_len: int = 256
    pattern: re.Pattern[str] | None = None
    choices: frozenset[str] | None = None

    def check(self, name: str, value: Any) -> None:
        """Validate a string field."""
        if type(value) is not str:
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise ValueError(f"{name} is longer than {self.max_len} characters ({len(value)})")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ValueError(f"{name} must match {self.pattern.pattern}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {sorted(self.choices)}, got {value!r}")


@dataclass(frozen=True, slots=True)
class BytesRule(Rule):
    """Bytes of a length in [min_len, max_len]."""

    min_len: int = 0
    max_len: int = 1 << 20

    def check(self, name: str, value: Any) -> None:
        """Validate a bytes field."""
        if type(value) is not bytes:
            raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len == self.max_len:
                raise ValueError(f"{name} must be {self.min_len} bytes, got {len(value)}")
            raise ValueError(
                f"{name} must be {self.min_len}..{self.max_len} bytes, got {len(value)}"
            )


@dataclass(frozen=True, slots=True)
class StrTupleRule(Rule):
    """A tuple of at most ``max_items`` distinct strings, each matching ``item``."""

    max_items: int = 10_000
    item: StrRule = StrRule(max_len=64, pattern=ID_PATTERN)

    def check(self, name: str, value: Any) -> None:
        """Validate a tuple-of-strings field."""
        if type(value) is not tuple:
            raise TypeError(f"{name} must be a tuple, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise ValueError(f"{name} has more than {self.max_items} items ({len(value)})")
        for i, item in enumerate(value):
            self.item.check(f"{name}[{i}]", item)
        if len(set(value)) != len(value):
            raise ValueError(f"{name} has duplicate items")


@dataclass(frozen=True, slots=True)
class PairsRule(Rule):
    """A tuple of (key, scalar) pairs with unique keys: a small config map."""

    max_items: int = 64

    def check(self, name: str, value: Any) -> None:
        """Validate a pairs field."""
        if type(value) is not tuple:
            raise TypeError(f"{name} must be a tuple of pairs, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise ValueError(f"{name} has more than {self.max_items} items")
        keys = []
        for i, pair in enumerate(value):
            if type(pair) is not tuple or len(pair) != 2:
                raise TypeError(f"{name}[{i}] must be a (key, value) pair")
            key, item = pair
            StrRule(max_len=64, pattern=re.compile(r"[a-z][a-z0-9_]{0,63}")).check(
                f"{name}[{i}].key", key
            )
            if type(item) not in (int, float, str, bool):
                raise TypeError(f"{name}[{key}] must be int, float, str or bool")
            if type(item) is float and not math.isfinite(item):
                raise ValueError(f"{name}[{key}] must be finite")
            if type(item) is str and len(item) > 256:
                raise ValueError(f"{name}[{key}] is longer than 256 characters")
            keys.append(key)
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name} has duplicate keys")


M = TypeVar("M", bound="Message")


class Message:
    """Base of the wire messages: frozen dataclasses that validate on construction.

    Subclasses set ``KIND`` and ``RULES`` (one rule per field, in field order).
    Compatibility rule: within a schema version the fields of a kind never
    change; a new field means a new schema version, decoders accept a closed
    set of versions, and fields are never removed or re-purposed. The one
    exception is ``OPTIONAL``: a field listed there (with its default) is
    left out of the encoding, and out of the signed bytes, while it holds
    that default, so a message that does not use it encodes, and is signed,
    exactly as before the field existed; a decoder of that version that
    predates the field refuses only the messages that do use it.
    """

    __slots__ = ()
    KIND: ClassVar[str] = ""
    RULES: ClassVar[Mapping[str, Rule]] = {}
    OPTIONAL: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        if names != list(self.RULES):
            raise TypeError(f"{type(self).__name__}: RULES do not match the fields")
        for name in names:
            self.RULES[name].check(f"{self.KIND}.{name}", getattr(self, name))
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks; override in subclasses."""

    def _present(self, name: str) -> bool:
        """False for an optional field at its default (it is not encoded)."""
        return name not in self.OPTIONAL or getattr(self, name) != self.OPTIONAL[name]

    def body(self) -> dict[str, Any]:
        """Return the body map in declared field order (optional fields at default left out)."""
        return {name: getattr(self, name) for name in self.RULES if self._present(name)}

    def _signature_view(self, kind: str) -> bytes:
        """Domain-separated canonical bytes of every encoded field but ``signature``."""
        body = {k: getattr(self, k) for k in self.RULES if k != "signature" and self._present(k)}
        return f"edgefl/v1/{kind}\x00".encode() + encode(kind, body)

    def to_bytes(self) -> bytes:
        """Return the canonical wire encoding."""
        return encode(self.KIND, self.body())

    @classmethod
    def from_bytes(cls: type[M], payload: bytes, *, max_size: int | None = None) -> M:
        """Decode a payload that must be of this kind.

        Raises:
            DecodeError: malformed, wrong kind, or a field fails its rule.
        """
        message = decode_any(payload, max_size=max_size)
        if not isinstance(message, cls):
            raise DecodeError(
                f"expected a {cls.KIND!r} message, got {message.KIND!r}", reason="wrong_kind"
            )
        return message


_REGISTRY: dict[str, type[Message]] = {}


def register(cls: type[M]) -> type[M]:
    """Class decorator: add a message type to the closed kind table."""
    if not cls.KIND or cls.KIND in _REGISTRY:
        raise TypeError(f"message kind {cls.KIND!r} is empty or registered twice")
    _REGISTRY[cls.KIND] = cls
    return cls


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True, use_single_float=False)
    return data


def _check(head: bytes) -> bytes:
    return hashlib.sha256(head).digest()[:CHECK_LEN]


def encode(kind: str, body: dict[str, Any]) -> bytes:
    """Encode ``[version, kind, body, check]`` canonically."""
    head = [SCHEMA_VERSION, kind, body]
    return _pack([*head, _check(_pack(head))])


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(obj, (list, tuple)):
        return max((_depth(x, level + 1) for x in obj), default=level + 1)
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    return level


DEFAULT_MAX_SIZE = 64 * 1024 * 1024


def decode_any(payload: bytes, *, max_size: int | None = None) -> Message:
    """Decode any registered message.

    Args:
        payload: the wire bytes.
        max_size: refuse larger payloads before parsing (default 64 MiB).

    Returns:
        The validated message.

    Raises:
        DecodeError: with ``reason`` one of ``too_large``, ``malformed``,
            ``structure``, ``version``, ``unknown_kind``, ``fields``,
            ``invalid_field``, ``checksum``, ``not_canonical``.
    """
    limit = DEFAULT_MAX_SIZE if max_size is None else max_size
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(
            f"payload must be bytes, got {type(payload).__name__}", reason="malformed"
        )
    payload = bytes(payload)
    if len(payload) > limit:
        raise DecodeError(
            f"payload of {len(payload)} bytes exceeds the {limit}-byte limit", reason="too_large"
        )
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_ext_len=0,
            max_array_len=min(len(payload), 1_000_000),
            max_map_len=min(len(payload), 1_000),
        )
    except Exception as exc:  # msgpack raises many types for bad input
        raise DecodeError(
            f"not valid msgpack: {type(exc).__name__}: {exc}", reason="malformed"
        ) from None
    if type(obj) is not tuple or len(obj) != 4:
        raise DecodeError("a message is a 4-element array", reason="structure")
    version, kind, body, check = obj
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise DecodeError(f"unsupported schema version {version!r}", reason="version")
    if type(kind) is not str or kind not in _REGISTRY:
        raise DecodeError(f"unknown message kind {kind!r}", reason="unknown_kind")
    if type(body) is not dict or type(check) is not bytes:
        raise DecodeError("message body must be a map and check bytes", reason="structure")
    if _depth(body) > MAX_DEPTH:
        raise DecodeError("message nested too deeply", reason="structure")
    cls = _REGISTRY[kind]
    if list(body) != [k for k in cls.RULES if k in body or k not in cls.OPTIONAL]:
        missing = [k for k in cls.RULES if k not in body]
        extra = [k for k in body if k not in cls.RULES]
        raise DecodeError(
            f"{kind}: fields differ from schema (missing {missing}, unknown {extra[:5]})",
            reason="fields",
        )
    if check != _check(_pack([version, kind, body])):
        raise DecodeError(f"{kind}: checksum mismatch (corrupted payload)", reason="checksum")
    try:
        message = cls(**body)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"invalid {kind}: {exc}", reason="invalid_field") from None
    if message.to_bytes() != payload:
        raise DecodeError(f"{kind}: payload is not in canonical form", reason="not_canonical")
    return message


def registered_kinds() -> dict[str, type[Message]]:
    """Return a copy of the closed kind table."""
    return dict(_REGISTRY)
