"""Datasets for simulations: sklearn's bundled sets and a synthetic sensor task.

Nothing is downloaded: digits and breast-cancer ship inside scikit-learn (the
``sim`` extra), and the sensor task is generated. Every split is
deterministic for its seed and standardised with statistics of the training
split only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DATASETS", "Dataset", "load_dataset", "sensor_maintenance"]


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train/validation/test splits of one task.

    Attributes:
        name: dataset name.
        task: ``"classification"`` or ``"regression"``.
        n_classes: number of classes (0 for regression).
    """

    name: str
    task: str
    n_classes: int
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[Any]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[Any]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[Any]

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])


def _split(
    name: str,
    task: str,
    n_classes: int,
    x: npt.NDArray[np.floating],
    y: npt.NDArray[np.generic],
    seed: int,
    val: float = 0.15,
    test: float = 0.2,
) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = round(test * len(x))
    n_val = round(val * len(x))
    te, va, tr = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)
    std[std == 0] = 1.0

    def norm(a: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = ((a - mean) / std).astype(np.float32)
        return out

    cast = np.int64 if task == "classification" else np.float32
    return Dataset(
        name,
        task,
        n_classes,
        norm(x[tr]),
        y[tr].astype(cast),
        norm(x[va]),
        y[va].astype(cast),
        norm(x[te]),
        y[te].astype(cast),
    )


def sensor_maintenance(
    n: int = 120_000, n_features: int = 24, seed: int = 0, classification: bool = True
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Synthetic predictive-maintenance data: will a machine fail soon?

    Each row is a window of sensor summaries (vibration, temperature,
    current, ...): correlated Gaussian features, a nonlinear wear score
    (interactions and a saturating term) and label noise. With
    ``classification`` the target is 1 when the wear score exceeds its 70th
    percentile, else the score itself (regression).
    """
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
    x = rng.normal(size=(n, n_features)) @ mixing
    w = rng.normal(size=n_features)
    score = x @ w + 0.8 * np.tanh(x[:, 0] * x[:, 1]) + 0.5 * np.abs(x[:, 2]) - 0.3 * x[:, 3] ** 2
    score += rng.normal(scale=0.6, size=n)
    if not classification:
        return x, score
    return x, (score > np.quantile(score, 0.7)).astype(np.float64)


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load a dataset by name: ``digits``, ``breast_cancer``, ``sensor`` or ``sensor_reg``.

    Raises:
        ValueError: unknown name.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return _split("digits", "classification", 10, d.data, d.target, seed)
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        return _split("breast_cancer", "classification", 2, d.data, d.target, seed)
    if name == "sensor":
        x, y = sensor_maintenance(seed=seed)
        return _split("sensor", "classification", 2, x, y, seed)
    if name == "sensor_reg":
        x, y = sensor_maintenance(seed=seed, classification=False, n=60_000)
        return _split("sensor_reg", "regression", 0, x, y, seed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


DATASETS = ("digits", "breast_cancer", "sensor", "sensor_reg")
