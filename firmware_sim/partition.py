"""Splitting a dataset across simulated devices: IID, Dirichlet label skew, quantity skew.

All partitioners are deterministic for their seed, give every device at
least ``min_size`` examples, and return index arrays into the training set.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["dirichlet", "iid", "partition", "quantity_skew"]

Parts = list[npt.NDArray[np.int64]]


def _check(n: int, devices: int, min_size: int) -> None:
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if n < devices * min_size:
        raise ValueError(f"{n} examples cannot give {devices} devices at least {min_size} each")


def iid(n: int, devices: int, *, seed: int = 0, min_size: int = 1) -> Parts:
    """Shuffle and deal the examples into near-equal shards."""
    _check(n, devices, min_size)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, devices)]


def quantity_skew(
    n: int, devices: int, *, seed: int = 0, sigma: float = 1.0, min_size: int = 2
) -> Parts:
    """Shard sizes drawn from a log-normal (a few devices hold much more data)."""
    _check(n, devices, min_size)
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, size=devices)
    spare = n - devices * min_size
    sizes = min_size + np.floor(weights / weights.sum() * spare).astype(np.int64)
    sizes[: n - int(sizes.sum())] += 1
    order = rng.permutation(n)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[i] : bounds[i + 1]]).astype(np.int64) for i in range(devices)]


def dirichlet(
    labels: npt.NDArray[np.integer],
    devices: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 2,
    max_tries: int = 100,
) -> Parts:
    """Label-skewed shards: each class is split across devices by Dirichlet(alpha).

    Small alpha (0.1) gives devices a few classes each; large alpha (100)
    approaches IID. Re-draws until every device has ``min_size`` examples.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    _check(len(labels), devices, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(np.int64)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    # Fall back: top up the smallest shards from the largest ones.
    sizes = sorted(range(devices), key=lambda d: len(parts[d]))
    for d in sizes:
        while len(parts[d]) < min_size:
            donor = max(range(devices), key=lambda k: len(parts[k]))
            parts[d].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(
    labels: npt.NDArray[np.generic],
    devices: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> Parts:
    """Dispatch by scheme name: ``iid``, ``dirichlet`` or ``quantity``.

    Raises:
        ValueError: unknown scheme.
    """
    if scheme == "iid":
        return iid(len(labels), devices, seed=seed)
    if scheme == "dirichlet":
        return dirichlet(np.asarray(labels).astype(np.int64), devices, alpha=alpha, seed=seed)
    if scheme == "quantity":
        return quantity_skew(len(labels), devices, seed=seed)
    raise ValueError(f"unknown partition scheme {scheme!r}: use iid, dirichlet or quantity")
