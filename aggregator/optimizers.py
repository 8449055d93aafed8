"""Server optimizers: turn a round's aggregate delta into the next global model.

The aggregator receives from the key holder the exact integer sum of the
contributions' quantized (and noised) deltas. :func:`mean_delta` divides it
by the quantization scale and by the number of contributions, or by a fixed
denominator (DP-FedAvg, McMahan et al. 2018: dividing by the expected cohort
size instead of the realised count keeps the sensitivity of the average
fixed, so the released model stays covered by the calibrated noise).

The optimizers follow Reddi et al. 2021 ("Adaptive Federated Optimization"):
the mean delta is treated as a pseudo-gradient pointing downhill (devices
send ``local - global``), so every optimizer *adds* a step along it.

All arithmetic is float64 and deterministic; the state is serialised with
:meth:`ServerOptimizer.state_bytes` and persisted with the model version it
produced, so a restarted aggregator computes bit-identical models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import msgpack
import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "ServerOptimizer",
    "make_optimizer",
    "mean_delta",
]

F64 = npt.NDArray[np.float64]


def mean_delta(
    int_sum: npt.ArrayLike, *, scale: float, count: int, fixed_denominator: int | None = None
) -> F64:
    """Average a round's integer aggregate back to float units.

    Args:
        int_sum: the key holder's per-coordinate integer sums.
        scale: quantization units per 1.0 (the packing spec's scale).
        count: contributions in the sum.
        fixed_denominator: divide by this instead of ``count`` (DP-FedAvg).

    Returns:
        The mean delta (float64).

    Raises:
        ValueError: non-positive count, scale or denominator.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    denominator = count if fixed_denominator is None else fixed_denominator
    if denominator < 1:
        raise ValueError(f"fixed_denominator must be >= 1, got {fixed_denominator}")
    return np.asarray(int_sum, dtype=np.float64) / (scale * float(denominator))


class ServerOptimizer(Protocol):
    """A server-side update rule with persistable state."""

    name: str

    def step(self, weights: F64, delta: F64) -> F64:
        """Return the new weights for the mean ``delta`` (state advances)."""
        ...

    def state_bytes(self) -> bytes:
        """The optimizer state, for the store."""
        ...

    def load_state(self, blob: bytes) -> None:
        """Restore a state written by :meth:`state_bytes` (empty: fresh state)."""
        ...


def _pack_arrays(name: str, arrays: Mapping[str, F64 | None]) -> bytes:
    doc: dict[str, Any] = {"optimizer": name}
    for key, value in arrays.items():
        doc[key] = None if value is None else np.ascontiguousarray(value, "<f8").tobytes()
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def _unpack_arrays(name: str, blob: bytes, keys: tuple[str, ...]) -> dict[str, F64 | None]:
    if not blob:
        return dict.fromkeys(keys)
    doc = msgpack.unpackb(blob, raw=False)
    if not isinstance(doc, dict) or doc.get("optimizer") != name:
        raise ValueError(f"stored optimizer state is not a {name} state")
    out: dict[str, F64 | None] = {}
    for key in keys:
        raw = doc.get(key)
        out[key] = None if raw is None else np.frombuffer(raw, dtype="<f8").astype(np.float64)
    return out


class FedAvg:
    """``w <- w + lr * delta`` (lr 1.0 is plain federated averaging)."""

    name = "fedavg"

    def __init__(self, *, lr: float = 1.0) -> None:
        """Create the rule with server learning rate ``lr``."""
        self.lr = float(lr)

    def step(self, weights: F64, delta: F64) -> F64:
        """Apply one step."""
        return weights + self.lr * delta

    def state_bytes(self) -> bytes:
        """FedAvg is stateless: an empty-state record."""
        return _pack_arrays(self.name, {})

    def load_state(self, blob: bytes) -> None:
        """Check the record's kind (there is no state)."""
        _unpack_arrays(self.name, blob, ())


class FedAvgM:
    """Server momentum: ``v <- beta v + delta``; ``w <- w + lr v`` (Hsu et al. 2019)."""

    name = "fedavgm"

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        """Create the rule (``momentum`` in [0, 1))."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.velocity: F64 | None = None

    def step(self, weights: F64, delta: F64) -> F64:
        """Apply one step."""
        v = delta.copy() if self.velocity is None else self.momentum * self.velocity + delta
        self.velocity = v
        return weights + self.lr * v

    def state_bytes(self) -> bytes:
        """The velocity."""
        return _pack_arrays(self.name, {"velocity": self.velocity})

    def load_state(self, blob: bytes) -> None:
        """Restore the velocity."""
        self.velocity = _unpack_arrays(self.name, blob, ("velocity",))["velocity"]


class FedAdam:
    """Adam on the server (Reddi et al. 2021, no bias correction).

    ``m <- b1 m + (1 - b1) d``; ``v <- b2 v + (1 - b2) d^2``;
    ``w <- w + lr m / (sqrt(v) + tau)``.
    """

    name = "fedadam"

    def __init__(
        self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        """Create the rule; ``tau`` bounds the adaptivity (their epsilon)."""
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), tau
        self.m: F64 | None = None
        self.v: F64 | None = None

    def step(self, weights: F64, delta: F64) -> F64:
        """Apply one step."""
        m = np.zeros_like(delta) if self.m is None else self.m
        v = np.zeros_like(delta) if self.v is None else self.v
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self.beta2 * v + (1.0 - self.beta2) * delta * delta
        self.m, self.v = m, v
        return weights + self.lr * m / (np.sqrt(v) + self.tau)

    def state_bytes(self) -> bytes:
        """First and second moments."""
        return _pack_arrays(self.name, {"m": self.m, "v": self.v})

    def load_state(self, blob: bytes) -> None:
        """Restore the moments."""
        state = _unpack_arrays(self.name, blob, ("m", "v"))
        self.m, self.v = state["m"], state["v"]


def make_optimizer(settings: Mapping[str, Any]) -> ServerOptimizer:
    """Build an optimizer from a config table (``name`` plus its parameters).

    Raises:
        ConfigError: unknown name or parameters.
    """
    params = dict(settings)
    name = str(params.pop("name", "fedavg")).lower()
    params.pop("fixed_denominator", None)
    table: dict[str, Any] = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam}
    if name not in table:
        raise ConfigError(f"unknown server optimizer {name!r}; choose one of {sorted(table)}")
    try:
        opt: ServerOptimizer = table[name](**{k: float(v) for k, v in params.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer {name}: {exc}") from None
    return opt
