"""The :class:`Trainer` protocol (local training as the agent sees it) and its adapters.

A trainer is three members, and the agent owns the round loop::

    class MyTrainer:
        num_params = 15                      # length of the flat weight vector

        def fit(self, weights, config, *, seed):
            new = ...                        # train from `weights` on local data
            return FitResult(weights=new, num_examples=len(x), metrics={"loss": 0.3})

        def evaluate(self, weights):
            return EvaluateResult(loss=0.3, num_examples=len(x), metrics={"accuracy": 0.9})

What a trainer returns is checked before anything is privatized:
a malformed result raises :class:`TrainerContractError`, whose message shows a
correct return. :class:`ModelTrainer` adapts any :class:`~edge_sdk.models.Model`;
:func:`load_trainer` builds a trainer from ``model = "package.module:factory"``
in the device's own ``[training]`` table.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError, ModelError, RemoteProtocolError
from edge_sdk.models import Model, TrainConfig

__all__ = [
    "EvaluateResult",
    "FitResult",
    "ModelTrainer",
    "TrainResult",
    "Trainer",
    "TrainerContractError",
    "check_evaluate_result",
    "check_fit_result",
    "check_round_training",
    "load_trainer",
    "train_config_from",
]

FloatVec = npt.NDArray[np.float32]

_TRAIN_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "prox_mu", "max_steps")

_FIT_EXAMPLE = (
    "return FitResult(weights=new_weights, num_examples=len(x), metrics={'loss': 0.31})\n"
    "    # weights: a 1-D float numpy array of length num_params, all finite"
)
_EVALUATE_EXAMPLE = (
    "return EvaluateResult(loss=0.31, num_examples=len(x), metrics={'accuracy': 0.92})"
)
_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class TrainerContractError(ModelError):
    """A trainer returned something the :class:`Trainer` protocol does not allow.

    The message names what was wrong and shows a correct return statement.
    """

    reason = "trainer_contract"


def _contract(what: str, problem: str, example: str) -> TrainerContractError:
    return TrainerContractError(f"{what} {problem}; return, for example:\n    {example}")


def _check_metrics(metrics: Any, what: str, example: str) -> Mapping[str, float]:
    if not isinstance(metrics, Mapping):
        raise _contract(
            what, f"metrics must be a dict of floats, got {type(metrics).__name__}", example
        )
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise _contract(what, f"metric names must be strings, got {key!r}", example)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise _contract(
                what, f"metric {key!r} must be a number, got {type(value).__name__}", example
            )
        if not math.isfinite(float(value)):
            raise _contract(what, f"metric {key!r} is {float(value)} (must be finite)", example)
        out[key] = float(value)
    return types.MappingProxyType(out)


def _check_count(value: Any, what: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise _contract(what, f"num_examples must be an integer >= 1, got {value!r}", example)
    return int(value)


@dataclass(frozen=True, slots=True)
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        weights: the new flat weights (1-D, finite; stored as read-only float32).
            The agent computes the update as ``weights - global weights``.
        num_examples: local examples trained on (kept on the device: the sum
            the aggregator decrypts is unweighted, so data size never leaves it).
        metrics: local training metrics (finite floats), e.g. ``{"loss": 0.31}``;
            logged on the device, never published.

    Raises:
        TrainerContractError: a field is malformed.
    """

    weights: npt.NDArray[Any]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = "FitResult"
        w = self.weights
        if not isinstance(w, np.ndarray):
            raise _contract(
                what, f"weights must be a numpy array, got {type(w).__name__}", _FIT_EXAMPLE
            )
        if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
            raise _contract(what, f"weights must be numeric, got dtype {w.dtype}", _FIT_EXAMPLE)
        if w.ndim != 1:
            raise _contract(
                what,
                f"weights must be 1-D (flatten with .ravel() or np.concatenate), got shape "
                f"{w.shape}",
                _FIT_EXAMPLE,
            )
        w32 = np.array(w, dtype=np.float32)
        if not np.all(np.isfinite(w32)):
            raise _contract(what, "weights contain NaN or infinity", _FIT_EXAMPLE)
        w32.flags.writeable = False
        object.__setattr__(self, "weights", w32)
        object.__setattr__(
            self, "num_examples", _check_count(self.num_examples, what, _FIT_EXAMPLE)
        )
        object.__setattr__(self, "metrics", _check_metrics(self.metrics, what, _FIT_EXAMPLE))


@dataclass(frozen=True, slots=True)
class EvaluateResult:
    """What :meth:`Trainer.evaluate` returns.

    Attributes:
        loss: the mean loss of the weights on local data (finite).
        num_examples: local examples evaluated on (>= 1).
        metrics: more finite floats, e.g. ``{"accuracy": 0.92}``; logged on the
            device, never published.

    Raises:
        TrainerContractError: a field is malformed.
    """

    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = "EvaluateResult"
        loss = self.loss
        if isinstance(loss, bool) or not isinstance(loss, (int, float, np.integer, np.floating)):
            raise _contract(
                what, f"loss must be a number, got {type(loss).__name__}", _EVALUATE_EXAMPLE
            )
        if not math.isfinite(float(loss)):
            raise _contract(what, f"loss is {float(loss)} (must be finite)", _EVALUATE_EXAMPLE)
        object.__setattr__(self, "loss", float(loss))
        count = _check_count(self.num_examples, what, _EVALUATE_EXAMPLE)
        object.__setattr__(self, "num_examples", count)
        object.__setattr__(self, "metrics", _check_metrics(self.metrics, what, _EVALUATE_EXAMPLE))


@runtime_checkable
class Trainer(Protocol):
    """Local training as the agent sees it: implement this to federate your own model.

    The agent calls :meth:`fit` once per round it takes part in, with the
    global weights, and :meth:`evaluate` when a new global model arrives. It
    checks both results (:func:`check_fit_result`, :func:`check_evaluate_result`).
    """

    @property
    def num_params(self) -> int:
        """Length of the flat weight vector (global models of another size are not applied)."""
        ...

    def fit(self, weights: FloatVec, config: Mapping[str, Any], *, seed: int) -> FitResult:
        """Train from ``weights`` on local data.

        Args:
            weights: the global model's flat float32 weights (a copy).
            config: the round's training settings (``epochs``, ``lr``,
                ``batch_size``, ... as the aggregator announced them).
            seed: data-order randomness for this round (never privacy noise).

        Returns:
            A :class:`FitResult` with the new weights.
        """
        ...

    def evaluate(self, weights: FloatVec) -> EvaluateResult:
        """Return the loss and metrics of ``weights`` on local data."""
        ...


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What :meth:`ModelTrainer.train` returns (the older interface; use :class:`FitResult`)."""

    weights: FloatVec
    metrics: Mapping[str, float]


def _name(trainer: object, method: str) -> str:
    return f"{type(trainer).__name__}.{method}"


def check_fit_result(trainer: object, result: object, num_params: int) -> FitResult:
    """Check what ``trainer.fit`` returned.

    Raises:
        TrainerContractError: not a :class:`FitResult`, or weights of the wrong length.
    """
    what = f"{_name(trainer, 'fit')}()"
    if not isinstance(result, FitResult):
        raise _contract(what, f"returned a {type(result).__name__}, not a FitResult", _FIT_EXAMPLE)
    if result.weights.shape[0] != num_params:
        raise _contract(
            what,
            f"returned {result.weights.shape[0]} weights, expected num_params = {num_params}",
            _FIT_EXAMPLE,
        )
    return result


def check_evaluate_result(trainer: object, result: object) -> EvaluateResult:
    """Check what ``trainer.evaluate`` returned.

    Raises:
        TrainerContractError: not an :class:`EvaluateResult`.
    """
    if not isinstance(result, EvaluateResult):
        raise _contract(
            f"{_name(trainer, 'evaluate')}()",
            f"returned a {type(result).__name__}, not an EvaluateResult",
            _EVALUATE_EXAMPLE,
        )
    return result


def check_round_training(trainer: object, settings: Mapping[str, Any]) -> TrainConfig:
    """Check a round's announced ``train`` settings on the device, before it trains.

    The settings come from the aggregator (signed, but the aggregator is the
    party the design defends against): every known key must make a valid
    :class:`~edge_sdk.models.TrainConfig` over the trainer's own defaults
    (``prox_mu`` in ``[0, MAX_PROX_MU]`` with ``lr * prox_mu < 2``, a
    positive ``lr``, ...). FedProx (``prox_mu > 0``) also needs a trainer that
    applies it: :class:`ModelTrainer` does (numpy linear and ONNX models
    alike); a trainer of your own must say so with ``supports_prox_mu =
    True``, otherwise the round is refused rather than trained without the
    proximal term the federation asked for.

    Returns:
        The settings as a TrainConfig.

    Raises:
        RemoteProtocolError: ``bad_train_settings`` or ``prox_unsupported``
            (the device skips the round with that reason).
    """
    base = trainer.base if isinstance(trainer, ModelTrainer) else None
    try:
        config = train_config_from(settings, base)
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(
            f"the round's train settings are invalid: {exc}", reason="bad_train_settings"
        ) from None
    if config.prox_mu > 0 and not getattr(trainer, "supports_prox_mu", False):
        raise RemoteProtocolError(
            f"the round asks for FedProx (prox_mu {config.prox_mu:g}) but "
            f"{type(trainer).__name__} does not apply it: add the term "
            "prox_mu * (w - weights) to its gradient and set supports_prox_mu = True",
            reason="prox_unsupported",
        )
    return config


def train_config_from(settings: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from a round's ``train`` pairs over ``base`` defaults.

    Unknown keys are ignored (a newer aggregator may send more); known keys
    are validated by TrainConfig itself.
    """
    values = {k: getattr(base or TrainConfig(), k) for k in _TRAIN_KEYS}
    values.update({k: settings[k] for k in _TRAIN_KEYS if k in settings})
    return TrainConfig(**values)


class ModelTrainer:
    """A :class:`Trainer` for any :class:`~edge_sdk.models.Model` on this device's data.

    Args:
        model: the local model (its layout must match the global model's).
        x: local features.
        y: local labels/targets.
        base: training defaults that round settings override.
        eval_data: ``(x, y)`` that :meth:`evaluate` uses (default: ``x``, ``y``).
    """

    #: :meth:`fit` applies the round's ``prox_mu`` (FedProx) through the model's SGD.
    supports_prox_mu = True

    def __init__(
        self,
        model: Model,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        base: TrainConfig | None = None,
        *,
        eval_data: tuple[npt.NDArray[Any], npt.NDArray[Any]] | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if len(x) == 0:
            raise ValueError("a device needs at least one local example")
        if eval_data is not None and (
            len(eval_data[0]) != len(eval_data[1]) or not eval_data[0].size
        ):
            raise ValueError("eval_data must be a non-empty (x, y) pair of equal lengths")
        self.model = model
        self.x = x
        self.y = y
        self.base = base
        self.eval_data = eval_data

    @property
    def num_params(self) -> int:
        """Length of the model's flat weight vector."""
        return int(self.model.layout.size)

    def fit(self, weights: FloatVec, config: Mapping[str, Any], *, seed: int) -> FitResult:
        """Set ``weights``, fit on the local data (SGD per the round's settings)."""
        self.model.set_flat(weights)
        prox = "prox_mu" in config and float(config["prox_mu"]) > 0
        report = self.model.fit(
            self.x,
            self.y,
            config=train_config_from(config, self.base),
            seed=seed,
            global_weights=weights if prox else None,
        )
        return FitResult(
            weights=self.model.get_flat(),
            num_examples=report.num_examples,
            metrics={"loss": float(report.final_loss)},
        )

    def evaluate(self, weights: FloatVec) -> EvaluateResult:
        """Set ``weights`` and return the model's metrics on the evaluation data."""
        x, y = self.eval_data if self.eval_data is not None else (self.x, self.y)
        self.model.set_flat(weights)
        metrics = dict(self.model.evaluate(x, y))
        loss = metrics.pop("loss")
        return EvaluateResult(loss=loss, num_examples=len(x), metrics=metrics)

    def train(self, weights: FloatVec, config: Mapping[str, Any], seed: int) -> TrainResult:
        """Older interface of :meth:`fit` (kept for callers such as the simulator)."""
        result = self.fit(weights, config, seed=seed)
        return TrainResult(weights=np.array(result.weights), metrics=dict(result.metrics))


def load_trainer(spec: str, settings: Mapping[str, Any] | None = None) -> Trainer:
    """Build a trainer from ``"package.module:factory"`` (``[training] model``).

    The module is imported and ``factory(**settings)`` called: ``settings`` is
    the ``[training]`` table without ``model`` (so a table holding only
    ``model`` calls ``factory()``). Name only code you trust: this executes
    it. The agent calls this with the device's own config file, never with
    anything received over the network.

    Raises:
        ConfigError: a malformed spec, a missing module or attribute, settings
            the factory does not accept, or a return value that is not a
            :class:`Trainer`.
    """
    if not _FACTORY_SPEC.match(spec):
        raise ConfigError(
            f"[training] model {spec!r} must be softmax, logistic, linear, onnx or "
            "'package.module:factory'"
        )
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"[training] model {spec!r}: cannot import {module_name!r} ({exc}); install it or "
            "put it on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"[training] model {spec!r}: {module_name} has no callable {attr!r}")
    kwargs = {k: v for k, v in (settings or {}).items() if k != "model"}
    _bind(factory, kwargs, spec)
    trainer = factory(**kwargs)
    missing = [m for m in ("num_params", "fit", "evaluate") if not hasattr(trainer, m)]
    if missing:
        raise ConfigError(
            f"[training] model {spec!r} returned a {type(trainer).__name__}, not a Trainer "
            f"(no {', '.join(missing)}): return an object with num_params, fit(weights, config, "
            "*, seed) -> FitResult and evaluate(weights) -> EvaluateResult"
        )
    num = trainer.num_params
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ConfigError(f"[training] model {spec!r}: num_params must be an int >= 1, got {num!r}")
    if not isinstance(trainer, Trainer):  # pragma: no cover - covered by the checks above
        raise ConfigError(f"[training] model {spec!r} did not return a Trainer")
    return trainer


def _bind(factory: Callable[..., Any], kwargs: Mapping[str, Any], spec: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"[training] model {spec!r}: the factory does not accept the [training] settings "
            f"{sorted(kwargs)} ({exc}); it is called with the [training] table (without "
            "'model') as keyword arguments"
        ) from None
