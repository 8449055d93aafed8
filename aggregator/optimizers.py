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

Privacy. An optimizer only ever sees the released, already-noised mean: the
devices add the noise before encryption and the committee decrypts only the
sum, so the server step is post-processing of a DP release. Its settings
(learning rate, momentum, adaptivity) cannot weaken or strengthen the
privacy the devices' ledgers charged, and a server learning rate scales the
signal and the noise alike. (Flower's central-DP wrapper adds noise after the
wrapped strategy's step, so there a server learning rate divides the
noise-to-signal ratio; here that ordering is impossible by construction and
tested in ``tests/test_optimizers_contract.py``.)

State. An optimizer holds no copy of the model: it is handed the published
global model every round, so a model that was replaced (reset, restored,
another store) cannot be stepped from a stale copy. Its own state (momentum,
moments) is serialised with :meth:`ServerOptimizer.state_bytes` and
persisted with the model version it produced, so a restarted aggregator
computes bit-identical models. A stored state is checked before it is used:
another optimizer's state, a corrupt record, a state for another model
dimension or with non-finite (or, for second moments, negative) values is
refused with :class:`OptimizerStateError`.

All arithmetic is float64 and deterministic. :data:`OPTIMIZERS` is the
registry ``[aggregator.optimizer] name`` selects from (and that the
optimizer contract suite runs over).
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import msgpack
import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError, DecodeError

__all__ = [
    "OPTIMIZERS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "OptimizerStateError",
    "ServerOptimizer",
    "make_optimizer",
    "mean_delta",
    "optimizer_settings",
]

F64 = npt.NDArray[np.float64]


class OptimizerStateError(DecodeError, ValueError):
    """A stored optimizer state is not one this optimizer can resume from.

    Raised for another optimizer's state, an undecodable record, arrays of
    the wrong length (a state of another model) and non-finite or negative
    second moments. Nothing is changed when it is raised.
    """

    reason = "optimizer_state"


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

    def load_state(self, blob: bytes, *, dimension: int | None = None) -> None:
        """Restore a state written by :meth:`state_bytes` (empty: fresh state).

        Raises:
            OptimizerStateError: not a state of this optimizer (for a model of
                ``dimension`` parameters, when given).
        """
        ...


def _pack_arrays(name: str, arrays: Mapping[str, F64 | None]) -> bytes:
    doc: dict[str, Any] = {"optimizer": name}
    for key, value in arrays.items():
        doc[key] = None if value is None else np.ascontiguousarray(value, "<f8").tobytes()
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def _unpack_arrays(
    name: str,
    blob: bytes,
    keys: tuple[str, ...],
    *,
    dimension: int | None = None,
    nonnegative: frozenset[str] = frozenset(),
) -> dict[str, F64 | None]:
    """Decode and check a state record; every check runs before anything is returned."""
    if not blob:
        return dict.fromkeys(keys)
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise OptimizerStateError(f"stored optimizer state is corrupt: {exc}") from None
    if not isinstance(doc, dict) or "optimizer" not in doc:
        raise OptimizerStateError("stored optimizer state is corrupt: not a state record")
    if doc["optimizer"] != name:
        raise OptimizerStateError(
            f"stored optimizer state is a {doc['optimizer']!r} state, not a {name} state: the "
            "store was written with another [aggregator.optimizer]; keep that optimizer or "
            "start a new store"
        )
    extra = sorted(str(k) for k in set(doc) - {"optimizer", *keys})
    if extra:
        raise OptimizerStateError(f"stored {name} state has unknown fields {extra}")
    out: dict[str, F64 | None] = {}
    length = dimension
    for key in keys:
        raw = doc.get(key)
        if raw is None:
            out[key] = None
            continue
        if not isinstance(raw, bytes) or len(raw) % 8:
            raise OptimizerStateError(f"stored {name} state: {key} is not a float64 array")
        arr = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        if length is None:
            length = arr.size
        if arr.size != length:
            raise OptimizerStateError(
                f"stored {name} state has {arr.size} values in {key}, the model "
                f"{length}: a state of another model"
            )
        if not np.all(np.isfinite(arr)):
            raise OptimizerStateError(f"stored {name} state: {key} holds NaN or infinity")
        if key in nonnegative and np.any(arr < 0):
            raise OptimizerStateError(f"stored {name} state: {key} holds negative values")
        out[key] = arr
    return out


def _check_rate(name: str, value: float, *, low: float, high: float | None = None) -> float:
    """``value`` as a float in ``[low, high)`` (``> low`` when ``low`` is 0 for rates)."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if high is None:
        if not v > low:
            raise ValueError(f"{name} must be > {low:g}, got {value!r}")
    elif not low <= v < high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value!r}")
    return v


class _Base(abc.ABC):
    """Shared state handling: subclasses list their state arrays in ``state_keys``."""

    name: str = ""
    #: The state arrays, in record order.
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: State arrays that are second moments (never negative).
    nonnegative: ClassVar[frozenset[str]] = frozenset()
    #: The setting that weighs past updates into the step (None: memoryless).
    momentum_setting: ClassVar[str | None] = None

    def _state(self) -> dict[str, F64 | None]:
        return {key: getattr(self, key) for key in self.state_keys}

    def state_bytes(self) -> bytes:
        """The state record (``{"optimizer": name, <array>: float64 bytes | None}``)."""
        return _pack_arrays(self.name, self._state())

    def load_state(self, blob: bytes, *, dimension: int | None = None) -> None:
        """Restore a record from :meth:`state_bytes` (empty bytes: fresh state).

        Raises:
            OptimizerStateError: another optimizer's record, a corrupt one, or
                arrays of another length than ``dimension`` (or each other).
        """
        state = _unpack_arrays(
            self.name, blob, self.state_keys, dimension=dimension, nonnegative=self.nonnegative
        )
        for key, value in state.items():
            setattr(self, key, value)

    @abc.abstractmethod
    def step(self, weights: F64, delta: F64) -> F64:
        """Return the new weights for the mean ``delta`` (state advances)."""

    def _check(self, weights: F64, delta: F64) -> None:
        if weights.ndim != 1 or weights.shape != delta.shape:
            raise ValueError(
                f"weights {weights.shape} and delta {delta.shape} must be equal 1-D shapes"
            )
        for key, value in self._state().items():
            if value is not None and value.shape != delta.shape:
                raise OptimizerStateError(
                    f"{self.name} state {key} has {value.size} values, the model {delta.size}: "
                    "a state of another model"
                )


class FedAvg(_Base):
    """``w <- w + lr * delta`` (lr 1.0 is plain federated averaging)."""

    name = "fedavg"

    def __init__(self, *, lr: float = 1.0) -> None:
        """Create the rule with server learning rate ``lr`` (> 0)."""
        self.lr = _check_rate("lr", lr, low=0.0)

    def step(self, weights: F64, delta: F64) -> F64:
        """Apply one step."""
        self._check(weights, delta)
        return weights + self.lr * delta


class FedAvgM(_Base):
    """Server momentum: ``v <- beta v + delta``; ``w <- w + lr v`` (Hsu et al. 2019)."""

    name = "fedavgm"
    state_keys = ("velocity",)
    momentum_setting = "momentum"

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        """Create the rule (``lr`` > 0, ``momentum`` in [0, 1))."""
        self.lr = _check_rate("lr", lr, low=0.0)
        self.momentum = _check_rate("momentum", momentum, low=0.0, high=1.0)
        self.velocity: F64 | None = None

    def step(self, weights: F64, delta: F64) -> F64:
        """Apply one step."""
        self._check(weights, delta)
        v = delta.copy() if self.velocity is None else self.momentum * self.velocity + delta
        self.velocity = v
        return weights + self.lr * v


class _Adaptive(_Base):
    """Reddi et al.'s adaptive family: a first moment ``m`` and a second moment ``v``.

    ``m <- b1 m + (1 - b1) d``; ``v`` by the subclass's rule;
    ``w <- w + lr m / (sqrt(v) + tau)``. ``tau`` bounds the adaptivity (a
    coordinate's step is at most ``lr * |m| / tau``).
    """

    state_keys = ("m", "v")
    nonnegative = frozenset({"v"})
    momentum_setting = "beta1"
    #: The second moment a fresh state starts from, as a multiple of tau^2.
    _v0_tau2 = 0.0

    def __init__(self, *, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.lr = _check_rate("lr", lr, low=0.0)
        self.beta1 = _check_rate("beta1", beta1, low=0.0, high=1.0)
        self.beta2 = _check_rate("beta2", beta2, low=0.0, high=1.0)
        self.tau = _check_rate("tau", tau, low=0.0)
        self.m: F64 | None = None
        self.v: F64 | None = None

    @abc.abstractmethod
    def _second(self, v: F64, d2: F64) -> F64:
        """The second-moment update of this optimizer (Adam, Yogi or Adagrad)."""

    def step(self, weights: F64, delta: F64) -> F64:
        """Apply one step."""
        self._check(weights, delta)
        m = np.zeros_like(delta) if self.m is None else self.m
        v = np.full_like(delta, self._v0_tau2 * self.tau * self.tau) if self.v is None else self.v
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self._second(v, delta * delta)
        self.m, self.v = m, v
        return weights + self.lr * m / (np.sqrt(v) + self.tau)


class FedAdam(_Adaptive):
    """Adam on the server (Reddi et al. 2021, no bias correction).

    ``m <- b1 m + (1 - b1) d``; ``v <- b2 v + (1 - b2) d^2``;
    ``w <- w + lr m / (sqrt(v) + tau)``. The moments start at zero.
    """

    name = "fedadam"

    def __init__(
        self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        """Create the rule; ``tau`` bounds the adaptivity (their epsilon)."""
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)

    def _second(self, v: F64, d2: F64) -> F64:
        out: F64 = self.beta2 * v + (1.0 - self.beta2) * d2
        return out


class FedYogi(_Adaptive):
    """Yogi on the server (Reddi et al. 2021, Algorithm 2; Zaheer et al. 2018).

    ``m <- b1 m + (1 - b1) d``; ``v <- v - (1 - b2) d^2 sign(v - d^2)``;
    ``w <- w + lr m / (sqrt(v) + tau)``. Unlike Adam's, the second moment
    moves by at most ``(1 - b2) d^2`` per round whichever way it goes, so one
    large (or noisy) round cannot make it forget its history. ``v`` starts at
    ``tau^2`` (Algorithm 2 requires ``v_{-1} >= tau^2``) and stays positive.
    """

    name = "fedyogi"
    _v0_tau2 = 1.0

    def __init__(
        self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        """Create the rule (``lr``, ``tau`` > 0; ``beta1``, ``beta2`` in [0, 1))."""
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)

    def _second(self, v: F64, d2: F64) -> F64:
        out: F64 = v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
        return out


class FedAdagrad(_Adaptive):
    """Adagrad on the server (Reddi et al. 2021, Algorithm 2).

    ``m <- b1 m + (1 - b1) d``; ``v <- v + d^2``;
    ``w <- w + lr m / (sqrt(v) + tau)``. The second moment only grows, so
    the per-coordinate step shrinks over the run. ``beta1`` defaults to 0
    (Adagrad proper, no momentum; the paper's algorithm allows it); ``v``
    starts at ``tau^2`` (Algorithm 2: ``v_{-1} >= tau^2``). ``beta2`` is not
    a setting: Adagrad has no decay.
    """

    name = "fedadagrad"
    _v0_tau2 = 1.0

    def __init__(self, *, lr: float = 0.01, beta1: float = 0.0, tau: float = 1e-3) -> None:
        """Create the rule (``lr``, ``tau`` > 0; ``beta1`` in [0, 1))."""
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau)

    def _second(self, v: F64, d2: F64) -> F64:
        out: F64 = v + d2
        return out


#: Every server optimizer ``[aggregator.optimizer] name`` can select, by name.
OPTIMIZERS: dict[str, type[_Base]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def optimizer_settings(name: str) -> dict[str, float]:
    """The settings of the optimizer ``name`` and their defaults.

    Raises:
        KeyError: no optimizer of that name.
    """
    params = inspect.signature(OPTIMIZERS[name].__init__).parameters
    return {k: float(p.default) for k, p in params.items() if k != "self"}


def make_optimizer(settings: Mapping[str, Any]) -> ServerOptimizer:
    """Build an optimizer from a config table (``name`` plus its parameters).

    ``fixed_denominator`` may sit in the same table (it belongs to
    :func:`mean_delta`) and is ignored here.

    Raises:
        ConfigError: unknown name, unknown setting, a setting that is not a
            number, or a value out of range (the message names it).
    """
    params = dict(settings)
    name = str(params.pop("name", "fedavg")).lower()
    params.pop("fixed_denominator", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown server optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[name]
    known = tuple(optimizer_settings(name))
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"optimizer {name} has no setting {', '.join(map(repr, unknown))} "
            f"(its settings: {', '.join(known)})"
        )
    values: dict[str, float] = {}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"optimizer {name}: {key} must be a number, got {value!r}")
        values[key] = float(value)
    factory: Callable[..., ServerOptimizer] = cls
    try:
        opt = factory(**values)
    except ValueError as exc:
        raise ConfigError(f"optimizer {name}: {exc}") from None
    return opt
