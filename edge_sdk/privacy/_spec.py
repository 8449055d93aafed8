"""The privacy policy a federation sets and the noise spec that travels on the wire.

Compatibility rule (as for every wire type in edgefl): fields are never
removed and new ones are optional. A :class:`NoiseSpec` dict carries a schema
``version`` and ``kind``; an unknown version, kind, mechanism or field is
rejected, never guessed: a device must not add noise under a privacy
statement it does not fully understand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from edge_sdk.errors import DecodeError
from edge_sdk.privacy._sampler import MAX_SIGMA2, SIGMA2_MAX_DEN

__all__ = [
    "DEFAULT_ROUNDING_BETA",
    "MAX_DIMENSION",
    "DPPolicy",
    "Mode",
    "NoiseSpec",
    "rounded_norm_bound_sq",
]

Mode = Literal["local", "distributed"]
MODES: tuple[str, ...] = ("local", "distributed")
#: The mechanisms a device knows how to apply (closed table).
#: Failure probability of one conditional-rounding attempt (Kairouz, Liu, Steinke 2021).
DEFAULT_ROUNDING_BETA = math.exp(-0.5)
#: Largest model dimension accepted from the wire.
MAX_DIMENSION = 1 << 31
_MAX_CLIENTS = 1 << 24
_MAX_ROUNDS = 1 << 24
_SPEC_VERSION = 1
_SPEC_KIND = "noise_spec"


def _finite_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _int_in(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def rounded_norm_bound_sq(
    clip: float, scale: float, dimension: int, beta: float = DEFAULT_ROUNDING_BETA
) -> int:
    """Squared L2 bound, in quantization units, of a clipped and rounded update.

    A delta of norm ``<= clip`` is multiplied by ``scale`` (norm ``<= c =
    clip * scale``) and stochastically rounded coordinate by coordinate.
    Rounding can grow the norm: always to less than ``(c + sqrt(d))^2``, and,
    with probability at least ``1 - beta``, to at most ``c^2 + d/4 +
    sqrt(2 ln(1/beta)) (c + sqrt(d)/2)`` (Kairouz, Liu, Steinke 2021,
    conditional randomized rounding). The device enforces the returned bound
    exactly (:func:`edge_sdk.privacy.within_norm_bound`) and re-rounds an
    update that exceeds it, so the privacy analysis uses the bound, never the
    probability.

    Args:
        clip: L2 clipping bound ``C`` of the float delta.
        scale: quantization units per 1.0.
        dimension: number of coordinates ``d``.
        beta: per-attempt failure probability of the tight bound, in (0, 1);
            smaller means fewer re-roundings but a looser bound.

    Returns:
        The integer ``B^2``; the sensitivity analysis uses ``B = sqrt(B^2)``.
    """
    c = _finite_positive("clip", clip) * _finite_positive("scale", scale)
    d = _int_in("dimension", dimension, 1, MAX_DIMENSION)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    loose = (c + math.sqrt(d)) ** 2
    tight = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2.0)
    return max(1, math.floor(min(loose, tight)))


def _check_mechanism(name: str) -> None:
    # the registry imports the accountant, which imports this module: look it up lazily
    from edge_sdk.privacy.mechanisms import mechanism

    mechanism(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class DPPolicy:
    """What a federation promises: ``(epsilon, delta)`` over ``rounds`` participations.

    Attributes:
        mode: ``"local"``: each update alone is (epsilon, delta)-DP against any
            change of the device's whole dataset (sensitivity ``2C``).
            ``"distributed"``: the sum of at least ``min_clients`` updates is
            (epsilon, delta)-DP for adding or removing one device (sensitivity
            ``C``); it assumes the key holder decrypts only such sums.
        epsilon: total epsilon over all participations of one device.
        delta: total delta, in (0, 1); choose well below 1 / (fleet size).
        rounds: the most rounds one device may take part in.
        clip: L2 clipping bound ``C`` of a device's model delta.
        min_clients: smallest number of honest contributions in any decrypted
            sum (distributed mode; 1 in local mode).
        rounding_beta: failure probability of one conditional-rounding try.
        mechanism: the noise mechanism (an entry of
            :data:`edge_sdk.privacy.mechanisms.REGISTRY`).
    """

    mode: Mode
    epsilon: float
    delta: float
    rounds: int
    clip: float
    min_clients: int = 1
    rounding_beta: float = DEFAULT_ROUNDING_BETA
    mechanism: str = "discrete_gaussian"

    def __post_init__(self) -> None:
        _check_mechanism(self.mechanism)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        _finite_positive("epsilon", self.epsilon)
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)):
            raise ValueError(f"delta must be a number, got {self.delta!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        _int_in("rounds", self.rounds, 1, _MAX_ROUNDS)
        _finite_positive("clip", self.clip)
        _int_in("min_clients", self.min_clients, 1, _MAX_CLIENTS)
        if self.mode == "local" and self.min_clients != 1:
            raise ValueError("min_clients applies to distributed mode only; use 1 in local mode")
        if not 0.0 < self.rounding_beta < 1.0:
            raise ValueError(f"rounding_beta must be in (0, 1), got {self.rounding_beta}")


@dataclass(frozen=True, slots=True, kw_only=True)
class NoiseSpec:
    """What each device adds, in quantization units; travels in round announcements.

    The device accounts for the spec it actually applied: its ledger charges
    the cost computed from ``sigma2``, ``norm_bound_sq``, ``dimension`` and
    ``min_clients``, so an announcement with too little noise is refused by
    the device's own budget check rather than silently trusted.

    Attributes:
        mechanism: ``"discrete_gaussian"`` (exact, CKS 2020).
        mode: ``"local"`` or ``"distributed"`` (see :class:`DPPolicy`).
        sigma2_num: numerator of the per-device per-coordinate variance
            parameter ``sigma^2`` (an exact rational).
        sigma2_den: its denominator, a power of two ``<= 2**16``.
        norm_bound_sq: enforced squared L2 bound of the rounded integer update.
        dimension: number of coordinates.
        min_clients: honest contributions assumed in each decrypted sum.
        scale: quantization units per 1.0 (the shared quantization grid).
        clip: L2 clip ``C`` of the float delta.
        delta: the delta of the policy (needed for the epsilon figures).
        rounds: participations the spec was calibrated for.
        epsilon_target: the policy's total epsilon.
    """

    mechanism: str = "discrete_gaussian"
    mode: Mode
    sigma2_num: int
    sigma2_den: int
    norm_bound_sq: int
    dimension: int
    min_clients: int
    scale: float
    clip: float
    delta: float
    rounds: int
    epsilon_target: float

    def __post_init__(self) -> None:
        _check_mechanism(self.mechanism)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        den = _int_in("sigma2_den", self.sigma2_den, 1, SIGMA2_MAX_DEN)
        if den & (den - 1):
            raise ValueError(f"sigma2_den must be a power of two, got {den}")
        _int_in("sigma2_num", self.sigma2_num, 1, MAX_SIGMA2)
        if math.gcd(self.sigma2_num, den) != 1:
            raise ValueError("sigma2_num/sigma2_den must be in lowest terms")
        _int_in("norm_bound_sq", self.norm_bound_sq, 1, 1 << 62)
        _int_in("dimension", self.dimension, 1, MAX_DIMENSION)
        _int_in("min_clients", self.min_clients, 1, _MAX_CLIENTS)
        _finite_positive("scale", self.scale)
        _finite_positive("clip", self.clip)
        _finite_positive("delta", self.delta)
        if not self.delta < 1.0:
            raise ValueError(f"delta must be < 1, got {self.delta}")
        _int_in("rounds", self.rounds, 1, _MAX_ROUNDS)
        _finite_positive("epsilon_target", self.epsilon_target)

    @property
    def sigma2(self) -> Fraction:
        """The exact per-device variance parameter ``sigma^2``."""
        return Fraction(self.sigma2_num, self.sigma2_den)

    @property
    def sigma(self) -> float:
        """``sqrt(sigma^2)`` as a float (for display)."""
        return math.sqrt(self.sigma2_num / self.sigma2_den)

    @property
    def norm_bound(self) -> float:
        """``B = sqrt(norm_bound_sq)`` rounded up to the next float."""
        b = math.sqrt(self.norm_bound_sq)
        return b if b * b >= self.norm_bound_sq else math.nextafter(b, math.inf)

    def to_dict(self) -> dict[str, Any]:
        """Return the wire form (plain JSON/msgpack types)."""
        return {
            "version": _SPEC_VERSION,
            "kind": _SPEC_KIND,
            "mechanism": self.mechanism,
            "mode": self.mode,
            "sigma2_num": self.sigma2_num,
            "sigma2_den": self.sigma2_den,
            "norm_bound_sq": self.norm_bound_sq,
            "dimension": self.dimension,
            "min_clients": self.min_clients,
            "scale": self.scale,
            "clip": self.clip,
            "delta": self.delta,
            "rounds": self.rounds,
            "epsilon_target": self.epsilon_target,
        }

    @classmethod
    def from_dict(cls, data: object) -> NoiseSpec:
        """Decode and validate the wire form.

        Raises:
            DecodeError: not a dict, wrong version or kind, missing or unknown
                field, or a field out of range.
        """
        if not isinstance(data, dict):
            raise DecodeError(f"noise spec must be a map, got {type(data).__name__}")
        if data.get("version") != _SPEC_VERSION:
            raise DecodeError(f"unsupported noise spec version {data.get('version')!r}")
        if data.get("kind") != _SPEC_KIND:
            raise DecodeError(f"not a noise spec (kind {data.get('kind')!r})")
        fields = {k: v for k, v in data.items() if k not in ("version", "kind")}
        expected = set(cls.__dataclass_fields__)
        unknown = sorted(set(fields) - expected)
        missing = sorted(expected - set(fields))
        if unknown:
            raise DecodeError(f"unknown noise spec fields {unknown}")
        if missing:
            raise DecodeError(f"missing noise spec fields {missing}")
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"invalid noise spec: {exc}") from exc
