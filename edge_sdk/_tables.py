"""Typed TOML tables: one frozen dataclass per table, unknown keys refused.

:func:`parse_table` turns a TOML table into a dataclass instance, checking
every key against the dataclass's fields and every value against the
field's type (``str``, ``int``, ``float`` (ints accepted), ``bool``,
``tuple[str, ...]`` (from a TOML array), ``dict[str, Any]`` (a sub-table,
checked by its own owner), each optionally ``| None``). A typo is an error
that names the table, the key and the known keys, never a silently ignored
setting. The device's ``device.toml``, the aggregator's ``aggregator.toml``
and the key holder's ``keyholder.toml`` all parse through here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from edge_sdk.errors import ConfigError

__all__ = ["parse_table", "table_keys"]

T = TypeVar("T")


def table_keys(cls: type[Any]) -> set[str]:
    """The keys a table dataclass accepts."""
    return {f.name for f in dataclasses.fields(cls)}


def _check_value(where: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check_value(where, inner, value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be an array of strings, got {value!r}")
        return tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    raise TypeError(f"{where}: unsupported table field type {hint!r}")  # a programming error


def parse_table(cls: type[T], table: Any, name: str, *, allow_extra: bool = False) -> T:
    """Build the dataclass ``cls`` from the TOML table ``[name]``.

    Args:
        cls: a dataclass whose fields are the table's keys.
        table: the parsed TOML table (a mapping).
        name: the table's name for messages (``aggregator``, ``committee``...).
        allow_extra: accept keys that are not fields (ignored here; the
            caller hands them on, e.g. to a user's model factory).

    Raises:
        ConfigError: not a table, an unknown key, a missing required key or
            a value of the wrong type (the message names the key).
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown and not allow_extra:
        raise ConfigError(
            f"unknown [{name}] settings: {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, f in fields.items():
        if key in table:
            values[key] = _check_value(f"[{name}] {key}", hints[key], table[key])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"[{name}] needs {key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{name}]: {exc}") from None
