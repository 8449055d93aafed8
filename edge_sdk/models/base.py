"""The model interface the device loop trains against, and its shared SGD loop.

Every backend (numpy linear models, ONNX models) exposes its weights two ways:
as named float32 arrays and as one flat float32 vector whose layout (names,
shapes, order) is fixed when the model is built and never changes. The flat
vector is what the privacy pipeline clips, quantizes, encrypts and sums, so
two devices holding the same architecture always agree on what slot ``i``
means.

Training is plain mini-batch SGD with optional momentum, L2 weight decay and
the FedProx proximal term. The batch shuffling uses a numpy ``Generator``
seeded per call: this is data-order randomness, not privacy randomness (noise
for differential privacy never comes from here).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edge_sdk.errors import ModelError
from edge_sdk.protocol.limits import MAX_PARAMS

__all__ = [
    "MAX_PROX_MU",
    "FloatArray",
    "Model",
    "TrainConfig",
    "TrainReport",
    "WeightLayout",
    "WeightSpec",
]

FloatArray = NDArray[np.float32]

#: Largest flat weight vector accepted (a bound on untrusted model files).
MAX_PARAMETERS = MAX_PARAMS  # the protocol's limit (edge_sdk/protocol/limits.py)

#: Largest FedProx coefficient accepted. FedProx (Li et al. 2020) tunes mu in
#: [0.001, 1]; beyond 10 local training barely leaves the global model.
MAX_PROX_MU = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightSpec:
    """One named weight tensor in a layout.

    Attributes:
        name: the tensor's name (for ONNX models, the initializer name).
        shape: its shape; ``()`` for a scalar.
    """

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("weight name must not be empty")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise ValueError(f"weight {self.name!r} has an invalid shape {self.shape!r}")

    @property
    def size(self) -> int:
        """Number of scalars in the tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """The ordered names and shapes that define a model's flat weight vector.

    Attributes:
        specs: the weights in flat-vector order.
    """

    specs: tuple[WeightSpec, ...]
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate weight names in layout: {names}")
        offsets = [0]
        for spec in self.specs:
            offsets.append(offsets[-1] + spec.size)
        if offsets[-1] > MAX_PARAMETERS:
            raise ModelError(
                f"model has {offsets[-1]} parameters, more than the limit {MAX_PARAMETERS}"
            )
        object.__setattr__(self, "_offsets", tuple(offsets))

    @classmethod
    def from_shapes(cls, items: Sequence[tuple[str, Sequence[int]]]) -> WeightLayout:
        """Build a layout from ``(name, shape)`` pairs, in order."""
        return cls(tuple(WeightSpec(name=n, shape=tuple(int(d) for d in s)) for n, s in items))

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return self._offsets[-1]

    @property
    def names(self) -> tuple[str, ...]:
        """The weight names in order."""
        return tuple(s.name for s in self.specs)

    def offset(self, name: str) -> tuple[int, int]:
        """Return ``(start, stop)`` of ``name`` in the flat vector.

        Raises:
            KeyError: no weight of that name.
        """
        for i, spec in enumerate(self.specs):
            if spec.name == name:
                return self._offsets[i], self._offsets[i + 1]
        raise KeyError(name)

    def split(self, flat: NDArray[Any]) -> dict[str, NDArray[Any]]:
        """Return views of ``flat`` reshaped to each weight (no copy).

        Raises:
            ValueError: ``flat`` is not a 1-D vector of length ``size``.
        """
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ValueError(
                f"flat weights must have shape ({self.size},), got {tuple(flat.shape)}"
            )
        return {
            spec.name: flat[self._offsets[i] : self._offsets[i + 1]].reshape(spec.shape)
            for i, spec in enumerate(self.specs)
        }

    def concat(self, weights: Mapping[str, ArrayLike]) -> FloatArray:
        """Flatten named weights into a new float32 vector in layout order.

        Raises:
            ValueError: a name is missing or extra, or a shape differs.
        """
        extra = set(weights) - set(self.names)
        if extra:
            raise ValueError(f"unknown weight names: {sorted(extra)}")
        out = np.empty(self.size, dtype=np.float32)
        for i, spec in enumerate(self.specs):
            if spec.name not in weights:
                raise ValueError(f"missing weight {spec.name!r}")
            arr = np.asarray(weights[spec.name])
            if arr.shape != spec.shape:
                raise ValueError(
                    f"weight {spec.name!r} must have shape {spec.shape}, got {arr.shape}"
                )
            out[self._offsets[i] : self._offsets[i + 1]] = arr.reshape(-1)
        return out

    def to_json(self) -> list[dict[str, Any]]:
        """Return a JSON-friendly description (for round announcements and logs)."""
        return [{"name": s.name, "shape": list(s.shape)} for s in self.specs]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Local training hyper-parameters, validated on construction.

    Attributes:
        epochs: passes over the local data (>= 1).
        batch_size: examples per SGD step (>= 1); the last batch may be smaller.
        lr: learning rate (> 0, finite).
        optimizer: only ``"sgd"`` (with optional momentum) for now.
        momentum: heavy-ball momentum in [0, 1); the buffer starts at zero each
            ``fit`` call (PyTorch's SGD semantics, dampening 0, no Nesterov).
        weight_decay: L2 penalty coefficient added to the gradient (>= 0).
        prox_mu: FedProx proximal coefficient in ``[0, MAX_PROX_MU]``: adds
            ``prox_mu * (w - w_global)`` to the gradient, pulling local training
            toward the global model on heterogeneous devices. ``lr * prox_mu``
            must be below 2: beyond it the proximal step alone overshoots the
            global model by more than it started from, and training diverges.
        max_steps: stop after this many SGD steps (None = run all epochs).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Literal["sgd"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1. Found {self.epochs!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1. Found {self.batch_size!r}")
        if self.optimizer != "sgd":
            raise ValueError(f"optimizer must be 'sgd'. Found {self.optimizer!r}")
        for name in ("lr", "momentum", "weight_decay", "prox_mu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number. Found {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite. Found {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0. Found {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1). Found {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay cannot be negative. Found {self.weight_decay!r}")
        if self.prox_mu < 0:
            raise ValueError(f"prox_mu cannot be negative. Found {self.prox_mu!r}")
        if self.prox_mu > MAX_PROX_MU:
            raise ValueError(f"prox_mu must be <= {MAX_PROX_MU:g}. Found {self.prox_mu!r}")
        if self.lr * self.prox_mu >= 2.0:
            raise ValueError(
                f"lr * prox_mu must be < 2 (the proximal step would overshoot the global "
                f"model and diverge). Found lr {self.lr!r}, prox_mu {self.prox_mu!r}"
            )
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or self.max_steps < 1
        ):
            raise ValueError(f"max_steps must be None or an integer >= 1. Found {self.max_steps!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainReport:
    """What one ``fit`` call did.

    Attributes:
        num_examples: local examples (the FedAvg weight of this update).
        epochs: epochs started (the last may be partial when ``max_steps`` hit).
        steps: SGD steps taken.
        epoch_losses: mean training loss of each epoch (example-weighted,
            measured on each batch before its step).
    """

    num_examples: int
    epochs: int
    steps: int
    epoch_losses: tuple[float, ...]

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last epoch (nan when no step ran)."""
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


@runtime_checkable
class Model(Protocol):
    """What the device loop needs from a trainable model.

    Implementations: :class:`~edge_sdk.models.LinearRegression`,
    :class:`~edge_sdk.models.LogisticRegression`,
    :class:`~edge_sdk.models.SoftmaxRegression`,
    :class:`~edge_sdk.models.OnnxModel`.
    """

    @property
    def layout(self) -> WeightLayout:
        """The fixed order, names and shapes of the flat weight vector."""
        ...

    def weights(self) -> dict[str, FloatArray]:
        """Return copies of the weights as named float32 arrays."""
        ...

    def set_weights(self, weights: Mapping[str, ArrayLike]) -> None:
        """Replace all weights from named arrays (validated before any change)."""
        ...

    def get_flat(self) -> FloatArray:
        """Return a copy of the weights as one float32 vector in layout order."""
        ...

    def set_flat(self, vec: ArrayLike) -> None:
        """Replace all weights from a flat vector (validated before any change)."""
        ...

    def fit(
        self,
        x: ArrayLike,
        y: ArrayLike,
        *,
        config: TrainConfig,
        seed: int,
        global_weights: ArrayLike | Mapping[str, ArrayLike] | None = None,
    ) -> TrainReport:
        """Train on local data in place; deterministic for a given seed."""
        ...

    def evaluate(self, x: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Return ``loss`` plus ``accuracy`` (classifiers) or ``rmse`` (regressors)."""
        ...

    def predict(self, x: ArrayLike) -> NDArray[np.float32]:
        """Return the model's output for each row of ``x``."""
        ...

    def loss_and_grad(self, x: ArrayLike, y: ArrayLike) -> tuple[float, FloatArray]:
        """Return the mean loss on ``(x, y)`` and its gradient as a flat vector."""
        ...


class SGDTrainable(abc.ABC):
    """Shared weight storage and SGD loop for the backends (internal base class).

    Subclasses set ``self._layout`` and ``self._flat`` (via :meth:`_init_storage`)
    and implement :meth:`_prepare` (validate and convert a dataset) and
    :meth:`_batch_loss_grad` (mean loss and flat gradient of one batch). The
    flat float32 buffer is updated in place, so per-weight views handed to a
    backend (e.g. as onnxruntime inputs) stay valid across steps.
    """

    _layout: WeightLayout
    _flat: FloatArray
    _views: dict[str, FloatArray]

    def _init_storage(self, layout: WeightLayout, initial: Mapping[str, ArrayLike]) -> None:
        self._layout = layout
        self._flat = layout.concat(initial)
        self._views = layout.split(self._flat)

    @property
    def layout(self) -> WeightLayout:
        """The fixed order, names and shapes of the flat weight vector."""
        return self._layout

    def weights(self) -> dict[str, FloatArray]:
        """Return copies of the weights as named float32 arrays."""
        return {name: view.copy() for name, view in self._views.items()}

    def set_weights(self, weights: Mapping[str, ArrayLike]) -> None:
        """Replace all weights from named arrays.

        Raises:
            ValueError: a name is missing/unknown, a shape differs, or a value is
                not finite (nothing is changed then).
        """
        self.set_flat(self._layout.concat(weights))

    def get_flat(self) -> FloatArray:
        """Return a copy of the weights as one float32 vector in layout order."""
        return self._flat.copy()

    def set_flat(self, vec: ArrayLike) -> None:
        """Replace all weights from a flat vector.

        Raises:
            ValueError: wrong length or non-finite values (nothing is changed then).
        """
        arr = np.asarray(vec)
        if arr.ndim != 1 or arr.shape[0] != self._layout.size:
            raise ValueError(
                f"flat weights must have shape ({self._layout.size},), got {arr.shape}"
            )
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"flat weights must be numeric, got dtype {arr.dtype}")
        arr32 = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(arr32)):
            raise ValueError("flat weights contain NaN or infinity")
        np.copyto(self._flat, arr32)

    # -- subclass hooks -------------------------------------------------
    @abc.abstractmethod
    def _prepare(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
        """Validate and convert one dataset for this backend."""

    @abc.abstractmethod
    def _batch_loss_grad(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[float, FloatArray]:
        """Mean loss and flat gradient of one batch."""

    # -- shared behaviour -------------------------------------------------
    def loss_and_grad(self, x: ArrayLike, y: ArrayLike) -> tuple[float, FloatArray]:
        """Return the mean loss on ``(x, y)`` and its gradient as a flat float32 vector."""
        xs, ys = self._prepare(x, y)
        loss, grad = self._batch_loss_grad(xs, ys)
        return loss, grad.copy()

    def _anchor(self, global_weights: ArrayLike | Mapping[str, ArrayLike] | None) -> FloatArray:
        if global_weights is None:
            return self._flat.copy()
        if isinstance(global_weights, Mapping):
            return self._layout.concat(global_weights)
        arr = np.asarray(global_weights, dtype=np.float32)
        if arr.shape != (self._layout.size,):
            raise ValueError(
                f"global_weights must have shape ({self._layout.size},), got {arr.shape}"
            )
        return arr.copy()

    def fit(
        self,
        x: ArrayLike,
        y: ArrayLike,
        *,
        config: TrainConfig,
        seed: int,
        global_weights: ArrayLike | Mapping[str, ArrayLike] | None = None,
    ) -> TrainReport:
        """Train in place with mini-batch SGD; deterministic for a given seed.

        Each epoch visits the examples in an order drawn from
        ``numpy.random.default_rng(seed)``. The update of one step is
        ``g = grad + weight_decay * w + prox_mu * (w - w_global)``,
        ``v = momentum * v + g``, ``w -= lr * v`` (PyTorch's SGD order).

        Args:
            x: local inputs, one example per row (first axis).
            y: local targets, one per example.
            config: hyper-parameters.
            seed: seeds the shuffling; same seed, data and weights give the
                same result.
            global_weights: the anchor of the FedProx term (flat vector or
                named arrays). Defaults to the weights at the start of the
                call, which in a round are the global model just received.

        Returns:
            A :class:`TrainReport`.

        Raises:
            ValueError: malformed data or global weights.
            ModelError: the loss became NaN or infinite (the weights are then
                restored to their values before the call).
        """
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        xs, ys = self._prepare(x, y)
        n = xs.shape[0]
        if n == 0:
            raise ValueError("cannot fit on an empty dataset")
        anchor = self._anchor(global_weights) if config.prox_mu > 0 else None
        start = self._flat.copy()
        velocity = np.zeros_like(self._flat) if config.momentum > 0 else None
        rng = np.random.default_rng(seed)
        w = self._flat
        steps = 0
        epoch_losses: list[float] = []
        epochs_started = 0
        # Overflow shows up as a non-finite loss or weight and is raised as a
        # ModelError below, so numpy's floating-point warnings are redundant.
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                for _ in range(config.epochs):
                    if config.max_steps is not None and steps >= config.max_steps:
                        break
                    epochs_started += 1
                    order = rng.permutation(n)
                    total = 0.0
                    seen = 0
                    for begin in range(0, n, config.batch_size):
                        if config.max_steps is not None and steps >= config.max_steps:
                            break
                        idx = order[begin : begin + config.batch_size]
                        loss, grad = self._batch_loss_grad(xs[idx], ys[idx])
                        if not math.isfinite(loss):
                            raise ModelError(
                                f"training loss became {loss} at step {steps}; "
                                "lower the learning rate",
                                reason="diverged",
                            )
                        g = grad
                        if config.weight_decay > 0:
                            g = g + np.float32(config.weight_decay) * w
                        if anchor is not None:
                            g = g + np.float32(config.prox_mu) * (w - anchor)
                        if velocity is not None:
                            velocity *= np.float32(config.momentum)
                            velocity += g
                            g = velocity
                        w -= np.float32(config.lr) * g
                        total += loss * len(idx)
                        seen += len(idx)
                        steps += 1
                    epoch_losses.append(total / seen if seen else math.nan)
                if not np.all(np.isfinite(w)):
                    raise ModelError("weights became NaN or infinite; lower the learning rate")
            except BaseException:
                np.copyto(self._flat, start)
                raise
        return TrainReport(
            num_examples=n, epochs=epochs_started, steps=steps, epoch_losses=tuple(epoch_losses)
        )


def check_features(x: ArrayLike, *, what: str = "x") -> NDArray[np.float64]:
    """Validate a numeric input array (finite, at least 1-D) and return float64."""
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr64 = arr.astype(np.float64, copy=False)
    if arr64.ndim < 1:
        raise ValueError(f"{what} must have at least one dimension, got a scalar")
    if not np.all(np.isfinite(arr64)):
        raise ValueError(f"{what} contains NaN or infinity")
    return arr64


def check_labels(y: ArrayLike, n: int, n_classes: int) -> NDArray[np.int64]:
    """Validate integer class labels in ``[0, n_classes)`` for ``n`` examples."""
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("labels must be whole numbers")
    elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    labels = arr.astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}); found {labels.min()}..{labels.max()}"
        )
    return labels
