"""Package attributes imported on first use (a module-level ``__getattr__``)."""

from __future__ import annotations

import importlib
import sys
from typing import Any


def lazy_attribute(package: str, table: dict[str, str], name: str) -> Any:
    """Import ``name`` from the module ``table`` names for it, and keep it in ``package``.

    Args:
        package: the package whose ``__getattr__`` this serves (``__name__``).
        table: attribute name -> the module that defines it.
        name: the attribute asked for.

    Raises:
        AttributeError: ``name`` is not in ``table``.
    """
    module = table.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
    return value
