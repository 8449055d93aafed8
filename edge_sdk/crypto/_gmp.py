"""gmpy2 helpers that work across gmpy2 versions (2.1.5 lacks ``mpz.from_bytes``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gmpy2

__all__ = ["mpz_from_bytes"]


def _fallback(data: bytes, byteorder: str) -> Any:
    return gmpy2.mpz(int.from_bytes(data, byteorder))  # type: ignore[arg-type]


#: ``mpz_from_bytes(data, "big")``: gmpy2's native decoder when present (~2x faster).
mpz_from_bytes: Callable[[bytes, str], Any] = getattr(gmpy2.mpz, "from_bytes", _fallback)
