"""Noise calibration: the smallest grid ``sigma^2`` that meets a policy's target.

The search runs on the same accountant the device's ledger uses
(:func:`edge_sdk.privacy.accounting.epsilon_spent`), and the returned spec is
checked against the target after rounding ``sigma^2`` up to the sampler's
grid, so a calibrated spec never overshoots the policy's epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from edge_sdk.crypto.packing import ExtraSlot
from edge_sdk.errors import PrivacyError
from edge_sdk.privacy._sampler import MAX_SIGMA2, sigma2_on_grid
from edge_sdk.privacy._spec import DPPolicy, NoiseSpec, rounded_norm_bound_sq
from edge_sdk.privacy.accounting import (
    PrivacyCost,
    compose_costs,
    compose_epsilon,
    cost_of,
    epsilon_spent,
    extra_slot_cost,
)
from edge_sdk.privacy.mechanisms import mechanism

__all__ = ["CalibrationError", "calibrate"]


class CalibrationError(PrivacyError):
    """No supported noise level meets the target (the message says why)."""

    reason = "calibration"


def _spec(policy: DPPolicy, sigma2: Fraction, bound_sq: int, scale: float, dim: int) -> NoiseSpec:
    return NoiseSpec(
        mechanism=policy.mechanism,
        mode=policy.mode,
        sigma2_num=sigma2.numerator,
        sigma2_den=sigma2.denominator,
        norm_bound_sq=bound_sq,
        dimension=dim,
        min_clients=policy.min_clients,
        scale=float(scale),
        clip=float(policy.clip),
        delta=float(policy.delta),
        rounds=policy.rounds,
        epsilon_target=float(policy.epsilon),
    )


def calibrate(
    policy: DPPolicy,
    *,
    scale: float,
    dimension: int,
    extras: Sequence[tuple[Sequence[ExtraSlot], int]] = (),
) -> NoiseSpec:
    """Return the noise each device adds so that ``policy`` holds over its rounds.

    ``rounds`` participations at the returned spec give an epsilon (by the
    device's own accountant) at most ``policy.epsilon``. In distributed mode
    the per-device ``sigma^2`` is at least 1/4 (where the KLS 2021 bound is
    stated) and the guarantee is for sums of at least ``min_clients``
    contributions: sums of more contributions carry more noise and are
    covered by post-processing.

    Args:
        policy: the validated privacy policy.
        scale: quantization units per 1.0 (shared with the crypto codec).
        dimension: the number of model coordinates.
        extras: ``(slots, releases)`` pairs: extra slots (already noised,
            docs/privacy.md "Extra slots") released that many times over the
            horizon (federated evaluation every k rounds, the adaptive-clip
            bit every round). Their cost is composed with the model's and
            the model noise is raised until the total meets the target.

    Returns:
        The :class:`NoiseSpec` to announce.

    Raises:
        CalibrationError: even the largest supported noise misses the target.
        ValueError: bad ``scale`` or ``dimension``.
    """
    bound_sq = rounded_norm_bound_sq(policy.clip, scale, dimension, policy.rounding_beta)
    probe = _spec(policy, Fraction(1), bound_sq, scale, dimension)
    extra_costs: list[tuple[PrivacyCost, int]] = [
        (compose_costs([extra_slot_cost(e, probe) for e in slots]), count)
        for slots, count in extras
        if slots and count
    ]
    if extra_costs and compose_epsilon(extra_costs, policy.delta) >= policy.epsilon:
        raise CalibrationError(
            f"the extra slots alone spend epsilon {compose_epsilon(extra_costs, policy.delta):.4g} "
            f"of {policy.epsilon}; give them more noise or release them less often"
        )

    def total(spec: NoiseSpec) -> float:
        if not extra_costs:
            return epsilon_spent(spec, policy.rounds)
        return compose_epsilon([(cost_of(spec), policy.rounds), *extra_costs], policy.delta)

    def eps(sigma2: Fraction) -> float:
        return total(_spec(policy, sigma2, bound_sq, scale, dimension))

    lo = mechanism(policy.mechanism).min_sigma2(policy.mode)
    hi = Fraction(MAX_SIGMA2)
    if eps(hi) > policy.epsilon:
        raise CalibrationError(
            f"epsilon {policy.epsilon} over {policy.rounds} rounds is out of reach: even "
            f"sigma^2 = 2**46 gives {eps(hi):.4g}; lower scale or clip, or raise epsilon"
        )
    if eps(lo) <= policy.epsilon:
        return _spec(policy, lo, bound_sq, scale, dimension)
    # Bisection on log sigma^2; `hi` always meets the target.
    log_lo, log_hi = math.log(lo), math.log(hi)
    for _ in range(100):
        mid = 0.5 * (log_lo + log_hi)
        candidate = sigma2_on_grid(math.exp(mid))
        if eps(candidate) <= policy.epsilon:
            log_hi = math.log(candidate)
            hi = candidate
        else:
            log_lo = mid
        if log_hi - log_lo < 1e-7:
            break
    spec = _spec(policy, hi, bound_sq, scale, dimension)
    if total(spec) > policy.epsilon:  # pragma: no cover - invariant
        raise CalibrationError("internal error: calibrated noise overshoots the target")
    return spec
