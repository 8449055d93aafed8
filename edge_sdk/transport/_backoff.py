"""Exponential reconnect backoff with full jitter (pure; randomness injected).

After a broker restart every device of a fleet loses its connection at the
same instant. With a deterministic backoff (paho's ``reconnect_delay_set``)
they all come back at the same instants too, and the broker sees a
thundering herd at 1 s, 2 s, 4 s... Full jitter spreads each wave uniformly
over [0, ceiling], where the ceiling doubles per failed attempt up to a cap.
"""

from __future__ import annotations

import random
from typing import Protocol

__all__ = ["Backoff", "UniformSource"]

_MAX_EXPONENT = 62


class UniformSource(Protocol):
    """Anything with ``random() -> float`` in [0, 1), e.g. :class:`random.Random`."""

    def random(self) -> float:
        """Return a float uniform in [0, 1)."""
        ...


class Backoff:
    """Reconnect delays: ceiling ``min(max_s, min_s * 2**attempt)``, jittered.

    This is not security randomness (it only spreads load), so
    :class:`random.Random` is an adequate default source.

    Args:
        min_s: ceiling of the first wait (attempt 0), seconds.
        max_s: largest ceiling, seconds.
        jitter: draw each wait uniformly in [0, ceiling] ("full jitter");
            False waits exactly the ceiling.
        rng: the uniform source; a fresh :class:`random.Random` when None.
    """

    def __init__(
        self,
        min_s: float,
        max_s: float,
        *,
        jitter: bool = True,
        rng: UniformSource | None = None,
    ) -> None:
        if not min_s > 0:
            raise ValueError(f"min_s must be > 0, got {min_s}")
        if max_s < min_s:
            raise ValueError(f"max_s must be >= min_s, got {max_s} < {min_s}")
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self.jitter = jitter
        self._rng: UniformSource = rng if rng is not None else random.Random()

    def ceiling(self, attempt: int) -> float:
        """Return the un-jittered ceiling for the ``attempt``-th retry (0-based)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        return min(self.max_s, self.min_s * float(2 ** min(attempt, _MAX_EXPONENT)))

    def delay(self, attempt: int) -> float:
        """Return the wait before the ``attempt``-th retry (0-based), seconds."""
        ceiling = self.ceiling(attempt)
        if not self.jitter:
            return ceiling
        draw = self._rng.random()
        if not 0.0 <= draw < 1.0:
            raise ValueError(f"random source returned {draw!r}, outside [0, 1)")
        return draw * ceiling
