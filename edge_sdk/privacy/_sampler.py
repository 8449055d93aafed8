"""Exact discrete Gaussian sampling, vectorized over whole update vectors.

Internal and dangerous on purpose: these functions add no noise to anything,
check no privacy budget and accept any :class:`~edge_sdk.randomness.RandomSource`,
including a seeded one. Use :func:`edge_sdk.privacy.add_noise` on a device.

Construction (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for
Differential Privacy", Algorithms 1-3). Every accept/reject decision is a
comparison between integers: a uniform integer below ``m`` (drawn by masking
and rejecting 64-bit words, so without modulo bias) against an integer
threshold. No floating point enters a sampling decision, so the output law is
exactly the discrete Gaussian ``P[X = x] ~ exp(-x^2 / (2 sigma^2))`` for the
rational ``sigma^2 = p / q``, up to the quality of the random source.

The pieces:

* ``Bernoulli(exp(-g))`` for rational ``g = num/den`` in ``[0, 1]``: draw
  ``A_k ~ Bernoulli(g / k)`` for ``k = 1, 2, ...`` until the first failure and
  return whether that ``k`` is odd. ``Bernoulli(g / k)`` is the AND of the
  independent ``Bernoulli(num / den)`` and ``Bernoulli(1 / k)``, so no bound
  ever exceeds ``den`` (nothing grows with ``k``). For ``g > 1``, ``floor(g)``
  independent ``Bernoulli(exp(-1))`` successes are required first.
* discrete Laplace with rational scale ``t / s`` (Algorithm 2).
* the Gaussian step: a Laplace candidate ``y`` with scale ``sigma^2 / mu`` is
  accepted with probability ``exp(-(|y| - mu)^2 / (2 sigma^2))``. This is
  exact for every ``mu > 0`` (the product of the two densities is
  ``exp(-y^2 / (2 sigma^2))`` times a constant); ``mu`` only sets the speed.
  We pick ``mu = floor(sigma)`` (an integer) when ``sigma >= 1`` so that the
  numbers stay small (``den = 2 p``), and ``mu = sigma^2`` below 1, as CKS do.

Vectorization: a batch of lanes runs each loop together; a pass draws fresh
randomness only for the lanes still undecided. Lanes whose integers would not
fit in int64 (reachable only with astronomically small probability) are
decided by the same algorithm in Python integers, so no lane is truncated.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from edge_sdk.randomness import RandomSource, randbelow, uniform_uint64

__all__ = [
    "MAX_SIGMA2",
    "SIGMA2_MAX_DEN",
    "bernoulli_exp",
    "discrete_gaussian",
    "discrete_gaussian_pmf",
    "sigma2_on_grid",
]

#: Denominator of the sigma^2 grid below 2^24 (above it sigma^2 is an integer).
SIGMA2_MAX_DEN = 1 << 16
#: Largest supported sigma^2 (sigma about 8.4 million quantization units); it
#: also bounds the numerator of sigma^2, which keeps every integer in int64.
MAX_SIGMA2 = 1 << 46
_GRID_SWITCH = 1 << 24
# Bound for q * (b|y| - a)^2 in int64; lanes above it use Python integers.
_INT64_SAFE = 1 << 62

I64 = npt.NDArray[np.int64]
B1 = npt.NDArray[np.bool_]


def sigma2_on_grid(sigma2: float | int | Fraction) -> Fraction:
    """Round ``sigma2`` UP to the sampler's grid of rationals.

    Below ``2**24`` the grid is multiples of ``2**-16``; above it, integers.
    Rounding up only adds noise, so a calibrated guarantee is kept.

    Args:
        sigma2: a positive variance in quantization units squared.

    Returns:
        The smallest grid value ``>= sigma2``.

    Raises:
        ValueError: ``sigma2`` is not finite, not positive or above ``2**46``.
    """
    if isinstance(sigma2, float) and not math.isfinite(sigma2):
        raise ValueError(f"sigma2 must be finite, got {sigma2}")
    x = Fraction(sigma2)
    if x <= 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    if x > MAX_SIGMA2:
        raise ValueError(f"sigma2 must be <= 2**46, got {float(x)}")
    den = SIGMA2_MAX_DEN if x < _GRID_SWITCH else 1
    num = -((-x.numerator * den) // x.denominator)  # ceil(x * den)
    return Fraction(num, den)


def _check_grid(sigma2: Fraction) -> tuple[int, int]:
    p, q = sigma2.numerator, sigma2.denominator
    if p <= 0 or q <= 0 or q > SIGMA2_MAX_DEN or q & (q - 1) or p > MAX_SIGMA2:
        raise ValueError(f"sigma2 {sigma2} is not on the sampler grid; use sigma2_on_grid()")
    return p, q


# --------------------------------------------------------------------------- uniform


def _uniform_below(rng: RandomSource, bound: int, n: int) -> I64:
    """``n`` independent uniform integers in ``[0, bound)``, exact (mask and reject)."""
    if not 1 <= bound <= (1 << 63):
        raise ValueError(f"bound out of range: {bound}")
    if bound == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    mask = np.uint64((1 << (bound - 1).bit_length()) - 1)
    ubound = np.uint64(bound)
    out = np.empty(n, dtype=np.uint64)
    todo: npt.NDArray[np.intp] | None = None
    while True:
        size = n if todo is None else todo.size
        draws = uniform_uint64(rng, size) & mask
        ok = draws < ubound
        if todo is None:
            out[:] = draws
            todo = np.flatnonzero(~ok)
        else:
            out[todo[ok]] = draws[ok]
            todo = todo[~ok]
        if todo.size == 0:
            return out.astype(np.int64)


def _random_bits(rng: RandomSource, n: int) -> B1:
    raw = np.frombuffer(rng.random_bytes((n + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw)[:n].astype(np.bool_)


# --------------------------------------------------------------------------- Bernoulli


def _bern_exp_frac(rng: RandomSource, num: I64 | None, den: int, n: int) -> B1:
    """Bernoulli(exp(-num/den)) per lane for ``0 <= num <= den`` (``num=None``: num = den)."""
    result = np.zeros(n, dtype=np.bool_)
    alive = np.arange(n)
    k = 1
    while alive.size:
        if num is None:
            a = np.ones(alive.size, dtype=np.bool_)
        else:
            a = _uniform_below(rng, den, alive.size) < num[alive]
        if k > 1:
            idx = np.flatnonzero(a)
            a[idx] = _uniform_below(rng, k, idx.size) == 0
        result[alive[~a]] = k % 2 == 1
        alive = alive[a]
        k += 1
    return result


def _bern_exp_one(rng: RandomSource, n: int) -> B1:
    """Bernoulli(exp(-1)) per lane."""
    return _bern_exp_frac(rng, None, 1, n)


def bernoulli_exp(rng: RandomSource, num: I64, den: int) -> B1:
    """Exact Bernoulli(exp(-num/den)) for each lane (``num >= 0``, ``1 <= den < 2**63``).

    Args:
        rng: the random source.
        num: non-negative int64 numerators.
        den: the common positive denominator.

    Returns:
        A boolean array: True with probability ``exp(-num[i]/den)``.
    """
    num = np.asarray(num, dtype=np.int64)
    if num.size and int(num.min()) < 0:
        raise ValueError("numerators must be >= 0")
    whole = num // den
    frac = num - whole * den
    res = np.ones(num.size, dtype=np.bool_)
    active = np.flatnonzero(whole > 0)
    done = 0
    while active.size:
        ok = _bern_exp_one(rng, active.size)
        res[active[~ok]] = False
        active = active[ok]
        done += 1
        active = active[whole[active] > done]
    idx = np.flatnonzero(res & (frac > 0))
    if idx.size:
        res[idx] = _bern_exp_frac(rng, frac[idx], den, idx.size)
    return res


def _bern_exp_scalar(rng: RandomSource, num: int, den: int) -> bool:
    """The same decision in Python integers (any size)."""
    whole, frac = divmod(num, den)
    for _ in range(whole):
        if not _bern_exp_scalar_frac(rng, den, den):
            return False
    return _bern_exp_scalar_frac(rng, frac, den) if frac else True


def _bern_exp_scalar_frac(rng: RandomSource, num: int, den: int) -> bool:
    k = 1
    while True:
        a = randbelow(rng, den) < num
        if a and k > 1:
            a = randbelow(rng, k) == 0
        if not a:
            return k % 2 == 1
        k += 1


# --------------------------------------------------------------------------- Laplace


def _geometric(rng: RandomSource, n: int) -> I64:
    """Number of Bernoulli(exp(-1)) successes before the first failure, per lane."""
    v = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    while active.size:
        ok = _bern_exp_one(rng, active.size)
        active = active[ok]
        v[active] += 1
    return v


def _discrete_laplace(rng: RandomSource, t: int, s: int, n: int) -> I64:
    """``n`` samples with ``P[Y = y] ~ exp(-|y| s / t)`` (CKS Algorithm 2)."""
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        m = n - filled
        m = m + m // 2 + 16
        if t == 1:
            u = np.zeros(m, dtype=np.int64)
        else:
            u = _uniform_below(rng, t, m)
            u = u[_bern_exp_frac(rng, u, t, m)]
        v = _geometric(rng, u.size)
        if v.size and int(v.max()) >= (1 << 62) // t:
            raise RuntimeError("geometric draw overflow")  # probability < exp(-2**16)
        y = (u + t * v) // s
        neg = _random_bits(rng, y.size)
        keep = ~(neg & (y == 0))
        y = np.where(neg, -y, y)[keep]
        take = min(y.size, n - filled)
        out[filled : filled + take] = y[:take]
        filled += take
    return out


# --------------------------------------------------------------------------- Gaussian


def discrete_gaussian(
    rng: RandomSource, sigma2: Fraction, n: int, *, int64_limit: int = _INT64_SAFE
) -> I64:
    """``n`` independent exact samples of the discrete Gaussian ``N_Z(0, sigma2)``.

    Args:
        rng: the random source (no default here: this is the raw part).
        sigma2: the variance parameter, on the grid of :func:`sigma2_on_grid`.
        n: number of samples.
        int64_limit: lanes whose Gaussian-step numerator would reach this bound
            are decided in Python integers (a test seam; the default is the
            int64 safety bound).

    Returns:
        An int64 array of ``n`` samples.
    """
    p, q = _check_grid(sigma2)
    if n < 0:
        raise ValueError(f"size must be >= 0, got {n}")
    if p >= q:  # sigma >= 1: mu = floor(sigma), an integer
        a, b = math.isqrt(p // q), 1
    else:  # sigma < 1: mu = sigma^2 (CKS's choice t = 1)
        a, b = p, q
    # Laplace scale sigma^2 / mu = (p b) / (q a); accept with exp(-q (b|y| - a)^2 / (2 p b^2)).
    t_lap, s_lap = p * b, q * a
    g = math.gcd(t_lap, s_lap)
    t_lap, s_lap = t_lap // g, s_lap // g
    den = 2 * p * b * b
    # |b|y| - a| <= diff_limit keeps q * diff^2 < int64_limit.
    diff_limit = math.isqrt((int64_limit - 1) // q)
    ay_limit = (diff_limit + a) // b

    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        m = n - filled
        m = m + m // 3 + 16
        y = _discrete_laplace(rng, t_lap, s_lap, m)
        ay = np.abs(y)
        safe = ay <= ay_limit
        accept = np.zeros(m, dtype=np.bool_)
        idx = np.flatnonzero(safe)
        diff = b * ay[idx] - a
        accept[idx] = bernoulli_exp(rng, q * diff * diff, den)
        for i in np.flatnonzero(~safe).tolist():
            big = b * int(ay[i]) - a
            accept[i] = _bern_exp_scalar(rng, q * big * big, den)
        y = y[accept]
        take = min(y.size, n - filled)
        out[filled : filled + take] = y[:take]
        filled += take
    return out


def discrete_gaussian_pmf(sigma2: float, support: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """The exact pmf of ``N_Z(0, sigma2)`` at ``support`` (float64; for tests and docs).

    The normalising constant sums ``exp(-k^2 / (2 sigma2))`` over
    ``|k| <= 40 sigma + 40``, beyond which the terms are below double precision.
    """
    if not sigma2 > 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    reach = int(40 * math.sqrt(sigma2)) + 40
    ks = np.arange(-reach, reach + 1, dtype=np.float64)
    norm = float(np.exp(-(ks * ks) / (2.0 * sigma2)).sum())
    x = np.asarray(support, dtype=np.float64)
    return np.exp(-(x * x) / (2.0 * sigma2)) / norm
