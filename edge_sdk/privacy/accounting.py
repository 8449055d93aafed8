"""Privacy accounting: Renyi-DP curves, composition, and a sound (epsilon, delta).

Every per-round guarantee is stored as an upper bound on the Renyi divergence
of every order ``alpha > 1`` in the form ``RDP(alpha) <= min_i (a_i alpha +
b_i)`` (an :class:`RdpCurve`). A discrete Gaussian with L2 sensitivity
``D`` and variance parameter ``sigma^2`` is ``rho``-zCDP with
``rho = D^2 / (2 sigma^2)`` (Canonne, Kamath, Steinke 2020): one piece
``(rho, 0)``. A sum of ``n`` discrete Gaussians adds the Kairouz, Liu, Steinke
2021 pieces (Proposition 14). Composition adds curves order by order.

The conversion to ``(epsilon, delta)`` is the one of Canonne, Kamath, Steinke
2020 (Proposition 12) / Asoodeh et al. 2021::

    epsilon = RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)

It holds for EVERY ``alpha > 1``; the device evaluates it on a fixed grid of
4,000 orders and takes the smallest, so a coarse grid can only over-report,
never under-report. Against Google's ``dp-accounting`` PLD figure for the
Gaussian mechanism this is 2-11% higher for 1 to 1,000 rounds (the tests hold
it within 15%).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_sdk.crypto.packing import ExtraSlot
from edge_sdk.errors import DecodeError
from edge_sdk.privacy._spec import NoiseSpec

__all__ = [
    "ALPHAS",
    "PrivacyCost",
    "PrivacyReport",
    "RdpCurve",
    "compose_costs",
    "compose_epsilon",
    "cost_of",
    "extra_slot_cost",
    "ddg_tau",
    "epsilon_from_rdp",
    "epsilon_spent",
    "pld_epsilon",
    "privacy_report",
    "round_cost",
]

#: The Renyi orders the device evaluates (any finite set gives a sound bound).
ALPHAS: npt.NDArray[np.float64] = 1.0 + np.exp(np.linspace(math.log(1e-5), math.log(1e7), 4000))
_LOG_TERM = np.log1p(-1.0 / ALPHAS)
_LOG_ALPHA = np.log(ALPHAS)

Which = Literal["central", "local"]


@dataclass(frozen=True, slots=True)
class RdpCurve:
    """An RDP upper bound ``RDP(alpha) <= min_i (slope_i * alpha + intercept_i)``.

    Attributes:
        pieces: the ``(slope, intercept)`` pairs, all finite and ``>= 0``.
    """

    pieces: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.pieces:
            raise ValueError("an RDP curve needs at least one piece")
        for piece in self.pieces:
            if len(piece) != 2:
                raise ValueError(f"a piece is (slope, intercept), got {piece!r}")
            for v in piece:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"RDP pieces must be numbers, got {piece!r}")
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"RDP pieces must be finite and >= 0, got {piece!r}")

    @classmethod
    def zcdp(cls, rho: float) -> RdpCurve:
        """The curve of a ``rho``-zCDP mechanism: ``RDP(alpha) = rho * alpha``."""
        return cls(((float(rho), 0.0),))

    def at(self, alphas: npt.NDArray[np.float64] = ALPHAS) -> npt.NDArray[np.float64]:
        """Evaluate the bound at each order."""
        values = [a * alphas + b for a, b in self.pieces]
        return np.minimum.reduce(values) if len(values) > 1 else values[0]

    def to_list(self) -> list[list[float]]:
        """Plain-list form for JSON."""
        return [[float(a), float(b)] for a, b in self.pieces]

    @classmethod
    def from_list(cls, data: object) -> RdpCurve:
        """Decode :meth:`to_list` output (ValueError on anything else)."""
        if not isinstance(data, list):
            raise ValueError(f"RDP curve must be a list, got {type(data).__name__}")
        pieces: list[tuple[float, float]] = []
        for piece in data:
            if not isinstance(piece, list) or len(piece) != 2:
                raise ValueError(f"bad RDP piece {piece!r}")
            pieces.append((piece[0], piece[1]))
        return cls(tuple(pieces))


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyCost:
    """What one participation costs, for the released sum and for the update alone.

    Attributes:
        central: RDP of the released (decrypted) aggregate w.r.t. this device.
        local: RDP of this device's single noised update (what a party that
            decrypted it alone would learn).
        mechanism: the mechanism name, for the record.
    """

    central: RdpCurve
    local: RdpCurve
    mechanism: str = "discrete_gaussian"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for the ledger."""
        return {
            "central": self.central.to_list(),
            "local": self.local.to_list(),
            "mechanism": self.mechanism,
        }

    @classmethod
    def from_dict(cls, data: object) -> PrivacyCost:
        """Decode :meth:`to_dict` output.

        Raises:
            DecodeError: malformed input.
        """
        if not isinstance(data, dict) or set(data) != {"central", "local", "mechanism"}:
            raise DecodeError(f"malformed privacy cost {data!r}")
        if not isinstance(data["mechanism"], str):
            raise DecodeError("privacy cost mechanism must be a string")
        try:
            return cls(
                central=RdpCurve.from_list(data["central"]),
                local=RdpCurve.from_list(data["local"]),
                mechanism=data["mechanism"],
            )
        except ValueError as exc:
            raise DecodeError(f"malformed privacy cost: {exc}") from exc


def ddg_tau(sigma2: float, n: int) -> float:
    """KLS 2021's tau: ``10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))``.

    It measures how far a sum of ``n`` discrete Gaussians of variance
    parameter ``sigma2`` is from a discrete Gaussian of ``n sigma2``.
    """
    if n <= 1:
        return 0.0
    ks = np.arange(1, n, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * sigma2 * ks / (ks + 1.0)).sum())


def cost_of(noise: NoiseSpec) -> PrivacyCost:
    """The privacy cost of one participation under ``noise``, by its mechanism's entry."""
    from edge_sdk.privacy.mechanisms import mechanism

    return mechanism(noise.mechanism).cost(noise)


def discrete_gaussian_cost(noise: NoiseSpec) -> PrivacyCost:
    """The discrete Gaussian's cost of one participation under ``noise``.

    Local mode: the neighbouring relation is any change of the device's data,
    so the L2 sensitivity of the rounded update is ``2B`` (``B^2`` =
    ``noise.norm_bound_sq``, enforced on the device); central = local.

    Distributed mode: add/remove one device from a sum of at least
    ``n = min_clients`` contributions, sensitivity ``B``. The central curve is
    the minimum of (i) KLS 2021 Proposition 14 for the sum of ``n`` discrete
    Gaussians (``alpha eps0^2 / 2 + tau d`` and ``alpha (eps0 + sqrt(d) tau)^2
    / 2`` with ``eps0^2 = B^2 / (n sigma^2)``) and (ii) one device's own
    noise alone (valid for any ``n``: the others' noise is post-processing).
    The local curve is one update against any change of the device's data
    (sensitivity ``2B``): weak by design, the encryption protects it.
    """
    sigma2 = float(noise.sigma2)
    b2 = float(noise.norm_bound_sq)
    local = RdpCurve.zcdp(4.0 * b2 / (2.0 * sigma2))
    if noise.mode == "local":
        return PrivacyCost(central=local, local=local, mechanism=noise.mechanism)
    n = noise.min_clients
    d = float(noise.dimension)
    single = (b2 / (2.0 * sigma2), 0.0)
    if n == 1:
        return PrivacyCost(central=RdpCurve((single,)), local=local, mechanism=noise.mechanism)
    tau = ddg_tau(sigma2, n)
    eps0_sq = b2 / (n * sigma2)
    pieces = [
        single,
        (eps0_sq / 2.0, tau * d),
        ((math.sqrt(eps0_sq) + math.sqrt(d) * tau) ** 2 / 2.0, 0.0),
    ]
    finite = tuple(p for p in pieces if math.isfinite(p[0]) and math.isfinite(p[1]))
    return PrivacyCost(central=RdpCurve(finite), local=local, mechanism=noise.mechanism)


def extra_slot_cost(slot: ExtraSlot, noise: NoiseSpec) -> PrivacyCost:
    """The cost of one extra slot (docs/privacy.md, "Extra slots") in a round under ``noise``.

    The device bounds the slot to ``[0, bound]``, so adding or removing a
    device moves the slot's sum by at most ``bound`` and any change of the
    device's data moves its own value by at most ``bound``: the L2
    sensitivity is ``bound`` for both the central and the local curve
    (a signed slot, ``[-bound, bound]``: ``bound`` for add/remove, ``2 bound``
    for a change of the device's data; local mode uses the latter) (a
    one-dimensional discrete Gaussian, summed over ``min_clients`` devices in
    distributed mode exactly as the model slots are, Kairouz, Liu, Steinke
    2021 with ``d = 1``).

    Raises:
        ValueError: the slot carries no noise (its cost would be unbounded).
    """
    if not slot.noised:
        raise ValueError(f"extra slot {slot.name!r} carries no noise: its DP cost is unbounded")
    sigma2 = slot.sigma2_num / slot.sigma2_den
    b2 = float(slot.bound) ** 2
    single = (b2 / (2.0 * sigma2), 0.0)
    # a signed slot's value may go from -bound to +bound when the data change
    local = RdpCurve((((4.0 if slot.signed else 1.0) * single[0], 0.0),))
    n = noise.min_clients
    if noise.mode == "local":
        return PrivacyCost(central=local, local=local, mechanism=noise.mechanism)
    if n == 1:
        return PrivacyCost(central=RdpCurve((single,)), local=local, mechanism=noise.mechanism)
    tau = ddg_tau(sigma2, n)
    eps0_sq = b2 / (n * sigma2)
    pieces = [single, (eps0_sq / 2.0, tau), ((math.sqrt(eps0_sq) + tau) ** 2 / 2.0, 0.0)]
    finite = tuple(p for p in pieces if math.isfinite(p[0]) and math.isfinite(p[1]))
    return PrivacyCost(central=RdpCurve(finite), local=local, mechanism=noise.mechanism)


def _sum_curves(curves: Sequence[RdpCurve]) -> RdpCurve:
    """The exact sum of min-of-lines curves: a min over every choice of one line each."""
    pieces: list[tuple[float, float]] = [(0.0, 0.0)]
    for curve in curves:
        summed = sorted({(a + c, b + d) for a, b in pieces for c, d in curve.pieces})
        # keep the Pareto front: a line with a larger slope AND a larger
        # intercept than another lies above it on every order
        pieces = []
        for line in summed:
            if not pieces or line[1] < pieces[-1][1]:
                pieces.append(line)
    return RdpCurve(tuple(pieces))


def compose_costs(costs: Sequence[PrivacyCost]) -> PrivacyCost:
    """One participation made of several releases: their RDP curves add (exactly).

    ``RDP(alpha)`` of a composition is the sum of the parts' ``RDP(alpha)``
    at every order; the sum of curves of the form ``min_i (a_i alpha + b_i)``
    is again of that form (a min over one line of each), so the composed
    cost is stored in the same shape and the ledger's figures are exact.
    """
    if not costs:
        raise ValueError("compose at least one cost")
    if len(costs) == 1:
        return costs[0]
    return PrivacyCost(
        central=_sum_curves([c.central for c in costs]),
        local=_sum_curves([c.local for c in costs]),
        mechanism=costs[0].mechanism,
    )


def round_cost(noise: NoiseSpec, extras: Sequence[ExtraSlot] = ()) -> PrivacyCost:
    """What one participation costs: the model slots under ``noise`` and every extra slot.

    This is what the device's ledger charges (the agent and the simulator
    both call it through :attr:`edge_sdk.pipeline.RoundContext.cost`).
    """
    return _round_cost(noise, tuple(extras))


@functools.lru_cache(maxsize=64)
def _round_cost(noise: NoiseSpec, extras: tuple[ExtraSlot, ...]) -> PrivacyCost:
    return compose_costs([cost_of(noise), *(extra_slot_cost(e, noise) for e in extras)])


def epsilon_from_rdp(rdp: npt.NDArray[np.float64], delta: float) -> float:
    """Convert RDP values on :data:`ALPHAS` to an ``epsilon`` for ``delta``.

    Args:
        rdp: RDP upper bounds, one per order in :data:`ALPHAS`.
        delta: target delta in (0, 1).

    Returns:
        The smallest sound epsilon over the grid (``>= 0``).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    eps = rdp + _LOG_TERM - (math.log(delta) + _LOG_ALPHA) / (ALPHAS - 1.0)
    best = float(np.min(eps))
    return max(best, 0.0)


def compose_epsilon(
    costs: Iterable[tuple[PrivacyCost, int]], delta: float, which: Which = "central"
) -> float:
    """Epsilon of a sequence of participations (adaptive composition of RDP).

    Args:
        costs: ``(cost, count)`` pairs; ``count`` participations at ``cost``.
        delta: target delta.
        which: ``"central"`` (released aggregates) or ``"local"`` (single updates).

    Returns:
        The composed epsilon; 0.0 for no participations.
    """
    total = np.zeros_like(ALPHAS)
    for cost, count in costs:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count:
            curve = cost.central if which == "central" else cost.local
            total += count * curve.at()
    return epsilon_from_rdp(total, delta)


def epsilon_spent(
    noise: NoiseSpec, participations: int, *, delta: float | None = None, which: Which = "central"
) -> float:
    """Epsilon after ``participations`` rounds under ``noise``.

    Args:
        noise: the applied noise spec.
        participations: number of rounds the device took part in (``>= 0``).
        delta: defaults to ``noise.delta``.
        which: ``"central"`` or ``"local"``.

    Returns:
        A sound upper bound on epsilon (never under-reports).
    """
    if isinstance(participations, bool) or not isinstance(participations, int):
        raise ValueError(f"participations must be an integer, got {participations!r}")
    return compose_epsilon(
        [(cost_of(noise), participations)], noise.delta if delta is None else delta, which
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyReport:
    """Both epsilons of a device after some participations.

    Attributes:
        participations: rounds taken part in.
        delta: the delta both figures refer to.
        central_epsilon: guarantee of the released aggregates (the headline).
        local_epsilon: guarantee of one device's updates on their own.
        pld_epsilon: Google dp-accounting's PLD figure for the equivalent
            continuous Gaussian, where installed (a tighter estimate, not
            the device's budget figure), else None.
    """

    participations: int
    delta: float
    central_epsilon: float
    local_epsilon: float
    pld_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {
            "participations": self.participations,
            "delta": self.delta,
            "central_epsilon": self.central_epsilon,
            "local_epsilon": self.local_epsilon,
            "pld_epsilon": self.pld_epsilon,
        }


def gaussian_noise_multiplier(noise: NoiseSpec) -> float:
    """Noise std over sensitivity of the central release, Gaussian-equivalent.

    Local mode: ``sigma / 2B``. Distributed: ``sqrt(n) sigma / B``. Used only
    for the PLD comparison figure.
    """
    if noise.mode == "local":
        return noise.sigma / (2.0 * noise.norm_bound)
    return math.sqrt(noise.min_clients) * noise.sigma / noise.norm_bound


def pld_epsilon(multipliers: Sequence[tuple[float, int]], delta: float) -> float | None:
    """Tight PLD epsilon for composed Gaussian mechanisms, via dp-accounting.

    Args:
        multipliers: ``(noise_multiplier, count)`` pairs.
        delta: target delta.

    Returns:
        The PLD epsilon, or None if ``dp_accounting`` is not installed.
    """
    try:
        from dp_accounting import dp_event, pld
    except ImportError:
        return None
    accountant = pld.PLDAccountant()
    for z, count in multipliers:
        if count:
            accountant.compose(dp_event.GaussianDpEvent(z), count)
    return float(accountant.get_epsilon(delta))


def privacy_report(
    noise: NoiseSpec, participations: int, *, with_pld: bool = False
) -> PrivacyReport:
    """Central and local epsilon (and optionally the PLD figure) after some rounds."""
    return PrivacyReport(
        participations=participations,
        delta=noise.delta,
        central_epsilon=epsilon_spent(noise, participations),
        local_epsilon=epsilon_spent(noise, participations, which="local"),
        pld_epsilon=(
            pld_epsilon([(gaussian_noise_multiplier(noise), participations)], noise.delta)
            if with_pld and participations
            else None
        ),
    )
