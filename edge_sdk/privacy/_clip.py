"""L2 clipping of a model delta: the step that bounds one device's influence."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import PrivacyError

__all__ = ["NonFiniteUpdateError", "clip_l2"]


class NonFiniteUpdateError(PrivacyError, ValueError):
    """A model delta contains NaN or infinity (training diverged); nothing is sent."""

    reason = "non_finite_update"


def clip_l2(delta: npt.ArrayLike, clip: float) -> tuple[npt.NDArray[np.float64], float]:
    """Scale ``delta`` down so that its L2 norm is at most ``clip``.

    A delta already inside the ball is returned unchanged (as a float64
    copy); the all-zero delta is safe. The norm is computed with a max-abs
    rescaling so that huge finite entries do not overflow to infinity.

    Args:
        delta: the model update, any shape (flattened to 1-D).
        clip: the clipping bound ``C > 0``.

    Returns:
        ``(clipped, norm)``: the clipped flat float64 vector (its
        ``np.linalg.norm`` is ``<= clip``) and the norm of the original.

    Raises:
        NonFiniteUpdateError: ``delta`` has a NaN or infinite entry.
        ValueError: ``clip`` is not a finite positive number.
    """
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    x = np.array(delta, dtype=np.float64, copy=True).reshape(-1)
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise NonFiniteUpdateError(f"model delta has {bad} NaN/inf entries; refusing to clip it")
    biggest = float(np.max(np.abs(x))) if x.size else 0.0
    if biggest == 0.0:
        return x, 0.0
    norm = biggest * float(np.linalg.norm(x / biggest))
    if norm <= clip:
        return x, norm
    x *= clip / norm
    # Floating-point rounding can leave the norm a few ulps above clip: shrink.
    while float(np.linalg.norm(x)) > clip:
        x *= 1.0 - 2.0**-40
    return x, norm
