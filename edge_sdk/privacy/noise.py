"""Adding exact discrete Gaussian noise to a quantized integer update.

The device pipeline is: delta -> L2 clip to C -> multiply by ``scale`` ->
stochastic rounding to integers (the crypto codec's ``quantize``) ->
:func:`add_noise` -> clamp -> pack -> encrypt. Noise is integer, so the
Paillier sum of noised updates is the exact sum of the devices' noise.

Threat model: the noise must be unpredictable to everyone but the device.
The default source is the OS's CSPRNG (:func:`edge_sdk.randomness.default_random`);
a seeded source is accepted only through an explicit opt-in.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import PrivacyError
from edge_sdk.privacy._sampler import discrete_gaussian, sigma2_on_grid
from edge_sdk.privacy._spec import NoiseSpec
from edge_sdk.privacy.mechanisms import mechanism
from edge_sdk.randomness import RandomSource, default_random

__all__ = [
    "NormBoundExceededError",
    "add_noise",
    "sample_discrete_gaussian",
    "squared_norm",
    "within_norm_bound",
]

_MAX_ABS = 1 << 40


class NormBoundExceededError(PrivacyError):
    """The rounded update is longer than the spec's bound: re-round, do not send."""

    reason = "norm_bound_exceeded"


def _resolve_rng(rng: RandomSource | None) -> RandomSource:
    return default_random() if rng is None else rng


def sample_discrete_gaussian(
    sigma2: Fraction | int | float, size: int, rng: RandomSource | None = None
) -> npt.NDArray[np.int64]:
    """Draw ``size`` exact samples of the discrete Gaussian ``N_Z(0, sigma2)``.

    Args:
        sigma2: variance parameter; rounded UP to the sampler's grid
            (multiples of ``2**-16`` below ``2**24``, integers above).
        size: number of samples.
        rng: random source; default: the OS CSPRNG.

    Returns:
        An int64 array.
    """
    return discrete_gaussian(_resolve_rng(rng), sigma2_on_grid(sigma2), size)


def _check_ints(ints: npt.NDArray[np.int64], dimension: int | None) -> npt.NDArray[np.int64]:
    arr = np.asarray(ints)
    if arr.dtype != np.int64:
        raise TypeError(f"quantized update must be int64, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"quantized update must be 1-D, got shape {arr.shape}")
    if dimension is not None and arr.size != dimension:
        raise ValueError(f"quantized update has {arr.size} coordinates, spec says {dimension}")
    if arr.size and (int(arr.max()) > _MAX_ABS or int(arr.min()) < -_MAX_ABS):
        raise ValueError("quantized update has coordinates beyond +-2**40")
    return arr


def squared_norm(ints: npt.NDArray[np.int64]) -> int:
    """Exact squared L2 norm of an int64 vector (Python integer)."""
    arr = _check_ints(ints, None)
    if arr.size == 0:
        return 0
    m = max(int(arr.max()), -int(arr.min()))
    if m * m * arr.size < (1 << 63):
        return int(np.dot(arr, arr))
    return sum(int(v) * int(v) for v in arr.tolist())


def within_norm_bound(ints: npt.NDArray[np.int64], noise: NoiseSpec) -> bool:
    """Whether a rounded update meets the spec's enforced norm bound.

    Conditional randomized rounding (KLS 2021): the device re-runs stochastic
    rounding until this is True (each try fails with probability at most
    ``rounding_beta``); the privacy analysis relies on the bound alone.
    """
    return squared_norm(ints) <= noise.norm_bound_sq


def add_noise(
    ints: npt.NDArray[np.int64],
    noise: NoiseSpec,
    rng: RandomSource | None = None,
    *,
    allow_insecure_rng: bool = False,
) -> npt.NDArray[np.int64]:
    """Return ``ints`` plus fresh noise of ``noise.mechanism`` (the registry's sampler).

    Args:
        ints: the clipped, scaled, rounded update (int64, length
            ``noise.dimension``), already within the norm bound.
        noise: the calibrated spec.
        rng: random source; default and production: the OS CSPRNG.
        allow_insecure_rng: must be True to accept a source whose ``secure``
            is False (tests with :class:`~edge_sdk.randomness.DeterministicRandom`).

    Returns:
        A new int64 array; ``ints`` is not modified.

    Raises:
        NormBoundExceededError: the update exceeds ``noise.norm_bound_sq``.
        ValueError: an insecure source without the opt-in, or a bad shape.
        TypeError: ``ints`` is not int64.
    """
    source = _resolve_rng(rng)
    if not source.secure and not allow_insecure_rng:
        raise ValueError(
            f"refusing to draw privacy noise from insecure source {source!r}; "
            "pass allow_insecure_rng=True only in tests"
        )
    arr = _check_ints(ints, noise.dimension)
    norm_sq = squared_norm(arr)
    if norm_sq > noise.norm_bound_sq:
        raise NormBoundExceededError(
            f"rounded update has squared norm {norm_sq} > bound {noise.norm_bound_sq}; "
            "re-round it (conditional randomized rounding)"
        )
    return arr + mechanism(noise.mechanism).sample(source, noise.sigma2, arr.size)
