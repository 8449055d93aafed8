"""Linear models in numpy: linear, logistic and softmax regression.

The weights are stored as float32 (the federation's wire format); losses and
gradients are computed in float64 with numerically stable formulas
(``logaddexp`` for the logistic loss, log-sum-exp with the maximum subtracted
for softmax), so large logits never overflow to inf or NaN.

Every model starts from zero weights, the usual start for these convex
problems (and the same on every device, so round 0 needs no broadcast).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edge_sdk.models.base import (
    FloatArray,
    SGDTrainable,
    WeightLayout,
    check_features,
    check_labels,
)

__all__ = ["LinearRegression", "LogisticRegression", "SoftmaxRegression"]


def _check_dim(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1. Found {value!r}")
    return value


class _LinearBase(SGDTrainable):
    """Shared input handling of the linear models (``x`` of shape (n, n_features))."""

    n_features: int

    def _features(self, x: ArrayLike) -> NDArray[np.float64]:
        xs = check_features(x)
        if xs.ndim == 1 and self.n_features == 1:
            xs = xs.reshape(-1, 1)
        if xs.ndim != 2 or xs.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (n, {self.n_features}), got {xs.shape}")
        return xs

    def _grad_vector(self, *parts: NDArray[np.float64]) -> FloatArray:
        return np.concatenate([p.reshape(-1) for p in parts]).astype(np.float32)


class LinearRegression(_LinearBase):
    """Least-squares linear regression: ``y_hat = x @ coef + intercept``.

    Loss: mean squared error over the batch. Metrics: ``loss`` (MSE) and
    ``rmse``. Layout: ``coef`` (n_features,), ``intercept`` (1,).
    """

    def __init__(self, n_features: int) -> None:
        """Create a zero-initialised model.

        Args:
            n_features: number of input features.
        """
        self.n_features = _check_dim("n_features", n_features)
        layout = WeightLayout.from_shapes([("coef", (n_features,)), ("intercept", (1,))])
        self._init_storage(layout, {"coef": np.zeros(n_features), "intercept": np.zeros(1)})

    def _prepare(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
        xs = self._features(x)
        ys = check_features(y, what="y").reshape(-1)
        if ys.shape[0] != xs.shape[0]:
            raise ValueError(f"y must have {xs.shape[0]} values, got {ys.shape[0]}")
        return xs, ys

    def _raw(self, xs: NDArray[np.float64]) -> NDArray[np.float64]:
        coef = self._views["coef"].astype(np.float64)
        return xs @ coef + float(self._views["intercept"][0])

    def _batch_loss_grad(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[float, FloatArray]:
        resid = self._raw(x) - y
        n = x.shape[0]
        loss = float(np.mean(resid * resid))
        d = (2.0 / n) * resid
        return loss, self._grad_vector(x.T @ d, np.array([d.sum()]))

    def evaluate(self, x: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Return ``loss`` (mean squared error) and ``rmse``."""
        xs, ys = self._prepare(x, y)
        resid = self._raw(xs) - ys
        mse = float(np.mean(resid * resid))
        return {"loss": mse, "rmse": float(np.sqrt(mse))}

    def predict(self, x: ArrayLike) -> NDArray[np.float32]:
        """Return the predicted value of each row, shape (n,)."""
        return self._raw(self._features(x)).astype(np.float32)


class LogisticRegression(_LinearBase):
    """Binary logistic regression with labels in {0, 1}.

    Loss: mean binary cross-entropy on the logit, computed as
    ``logaddexp(0, z) - y * z`` (no overflow for any logit). Metrics: ``loss``
    and ``accuracy`` (threshold 0.5). Layout: ``coef`` (n_features,),
    ``intercept`` (1,).
    """

    def __init__(self, n_features: int) -> None:
        """Create a zero-initialised model.

        Args:
            n_features: number of input features.
        """
        self.n_features = _check_dim("n_features", n_features)
        layout = WeightLayout.from_shapes([("coef", (n_features,)), ("intercept", (1,))])
        self._init_storage(layout, {"coef": np.zeros(n_features), "intercept": np.zeros(1)})

    def _prepare(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
        xs = self._features(x)
        ys = check_labels(y, xs.shape[0], 2).astype(np.float64)
        return xs, ys

    def _logits(self, xs: NDArray[np.float64]) -> NDArray[np.float64]:
        coef = self._views["coef"].astype(np.float64)
        return xs @ coef + float(self._views["intercept"][0])

    @staticmethod
    def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
        # exp(-logaddexp(0, -z)) == 1 / (1 + exp(-z)) without overflow.
        return np.exp(-np.logaddexp(0.0, -z))

    def _batch_loss_grad(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[float, FloatArray]:
        z = self._logits(x)
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
        d = (self._sigmoid(z) - y) / x.shape[0]
        return loss, self._grad_vector(x.T @ d, np.array([d.sum()]))

    def evaluate(self, x: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Return ``loss`` (binary cross-entropy) and ``accuracy``."""
        xs, ys = self._prepare(x, y)
        z = self._logits(xs)
        loss = float(np.mean(np.logaddexp(0.0, z) - ys * z))
        acc = float(np.mean((z > 0).astype(np.float64) == ys))
        return {"loss": loss, "accuracy": acc}

    def predict(self, x: ArrayLike) -> NDArray[np.float32]:
        """Return the probability of class 1 for each row, shape (n,)."""
        return self._sigmoid(self._logits(self._features(x))).astype(np.float32)


class SoftmaxRegression(_LinearBase):
    """Multi-class (multinomial) logistic regression with integer labels.

    Loss: mean softmax cross-entropy with a max-shifted log-sum-exp. Metrics:
    ``loss`` and ``accuracy``. Layout: ``weight`` (n_features, n_classes),
    ``bias`` (n_classes,).
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        """Create a zero-initialised model.

        Args:
            n_features: number of input features.
            n_classes: number of classes (>= 2).
        """
        self.n_features = _check_dim("n_features", n_features)
        if _check_dim("n_classes", n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2. Found {n_classes!r}")
        self.n_classes = n_classes
        layout = WeightLayout.from_shapes(
            [("weight", (n_features, n_classes)), ("bias", (n_classes,))]
        )
        self._init_storage(
            layout,
            {"weight": np.zeros((n_features, n_classes)), "bias": np.zeros(n_classes)},
        )

    def _prepare(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
        xs = self._features(x)
        return xs, check_labels(y, xs.shape[0], self.n_classes)

    def _logits(self, xs: NDArray[np.float64]) -> NDArray[np.float64]:
        weight = self._views["weight"].astype(np.float64)
        return xs @ weight + self._views["bias"].astype(np.float64)

    @staticmethod
    def _log_softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
        shifted = z - z.max(axis=1, keepdims=True)
        out: NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return out

    def _batch_loss_grad(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[float, FloatArray]:
        n = x.shape[0]
        logp = self._log_softmax(self._logits(x))
        loss = float(-np.mean(logp[np.arange(n), y]))
        d = np.exp(logp)
        d[np.arange(n), y] -= 1.0
        d /= n
        return loss, self._grad_vector(x.T @ d, d.sum(axis=0))

    def evaluate(self, x: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Return ``loss`` (cross-entropy) and ``accuracy``."""
        xs, ys = self._prepare(x, y)
        logp = self._log_softmax(self._logits(xs))
        loss = float(-np.mean(logp[np.arange(xs.shape[0]), ys]))
        acc = float(np.mean(np.argmax(logp, axis=1) == ys))
        return {"loss": loss, "accuracy": acc}

    def predict(self, x: ArrayLike) -> NDArray[np.float32]:
        """Return class probabilities, shape (n, n_classes)."""
        return np.exp(self._log_softmax(self._logits(self._features(x)))).astype(np.float32)
