"""The DP mechanism registry: one entry bundles a mechanism's sampler, cost and calibration.

``NoiseSpec.mechanism`` names an entry; :func:`edge_sdk.privacy.add_noise`,
:func:`edge_sdk.privacy.cost_of` and :func:`edge_sdk.privacy.calibrate`
dispatch through it, so a spec can never be labelled with one mechanism
while another's noise is added or charged. Adding a mechanism (e.g. Skellam)
is one module defining a :class:`Mechanism` plus its entry in
:data:`REGISTRY`, and the contract suite (``tests/test_privacy_mechanisms.py``)
runs over it: exactness against its own pmf, cost never below the
continuous-Gaussian reference, calibration never above the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.privacy._sampler import SIGMA2_MAX_DEN, discrete_gaussian, discrete_gaussian_pmf
from edge_sdk.privacy.accounting import PrivacyCost, discrete_gaussian_cost
from edge_sdk.randomness import RandomSource

__all__ = ["REGISTRY", "Mechanism", "mechanism"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Mechanism:
    """One additive integer noise mechanism.

    Attributes:
        name: the ``NoiseSpec.mechanism`` value.
        description: one line for docs and errors.
        exact: the sampler draws exactly from the stated distribution (no
            floating-point approximation); required for a production entry.
        sample: ``(rng, sigma2, size) -> int64 noise`` per coordinate.
        cost: the privacy cost of one participation under a spec.
        min_sigma2: smallest per-device variance parameter the cost is valid
            for, by mode (``"local"`` or ``"distributed"``).
        pmf: ``(sigma2, support) -> probabilities``, for the exactness hook.
    """

    name: str
    description: str
    exact: bool
    sample: Callable[[RandomSource, Fraction, int], npt.NDArray[np.int64]]
    cost: Callable[[Any], PrivacyCost]
    min_sigma2: Callable[[str], Fraction]
    pmf: Callable[[float, npt.NDArray[np.int64]], npt.NDArray[np.float64]]


def _dg_min_sigma2(mode: str) -> Fraction:
    # KLS 2021's bound for sums of discrete Gaussians is stated for sigma >= 1/2.
    return Fraction(1, 4) if mode == "distributed" else Fraction(1, SIGMA2_MAX_DEN)


DISCRETE_GAUSSIAN = Mechanism(
    name="discrete_gaussian",
    description="exact discrete Gaussian (Canonne, Kamath, Steinke 2020), accounted with "
    "Kairouz, Liu, Steinke 2021 for sums",
    exact=True,
    sample=discrete_gaussian,
    cost=discrete_gaussian_cost,
    min_sigma2=_dg_min_sigma2,
    pmf=discrete_gaussian_pmf,
)

#: Every mechanism a spec may name.
REGISTRY: dict[str, Mechanism] = {m.name: m for m in (DISCRETE_GAUSSIAN,)}


def mechanism(name: str) -> Mechanism:
    """The registry entry for ``name``.

    Raises:
        ValueError: unknown mechanism (the message lists the known ones).
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"mechanism must be one of {tuple(REGISTRY)}, got {name!r}")
    return entry
