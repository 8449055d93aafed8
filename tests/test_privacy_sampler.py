"""Statistical and structural tests of the exact discrete Gaussian sampler.

Every statistical test uses a fixed seed (DeterministicRandom), so the suite is
deterministic. The stated false-alarm rate is the probability that a CORRECT
sampler would fail the test on a random seed:
- chi-square goodness of fit: p-value threshold 1e-4 -> 1e-4 per test;
- mean, variance, symmetry and tail masses: 6 standard errors (normal
  approximation) -> about 2e-9 per check.
These tests catch gross errors (wrong scale, bias, asymmetry, lost tails);
exactness itself comes from the construction (integer decisions only).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest

import edge_sdk.randomness as randomness
from edge_sdk.privacy import noise as noise_mod
from edge_sdk.privacy import sample_discrete_gaussian, sigma2_on_grid
from edge_sdk.privacy._sampler import (
    _bern_exp_scalar,
    _discrete_laplace,
    _uniform_below,
    bernoulli_exp,
    discrete_gaussian,
    discrete_gaussian_pmf,
)
from edge_sdk.randomness import DeterministicRandom, SystemRandom

# scipy comes with the sim extra (scikit-learn), not with a device install:
# without it this module skips instead of failing at import.
stats = pytest.importorskip("scipy.stats")

N = 100_000
SIGMAS = [0.5, 1.0, 3.0, 10.0, 100.0]
P_THRESHOLD = 1e-4
SE = 6.0


def _exact_moments(sigma2: float) -> tuple[float, float]:
    reach = int(40 * math.sqrt(sigma2)) + 40
    ks = np.arange(-reach, reach + 1)
    pmf = discrete_gaussian_pmf(sigma2, ks)
    var = float((pmf * ks.astype(float) ** 2).sum())
    m4 = float((pmf * ks.astype(float) ** 4).sum())
    return var, m4


def _chi_square_p(samples: np.ndarray, sigma2: float) -> float:
    """Chi-square GOF against the exact pmf with bins of expected count >= 50."""
    reach = int(40 * math.sqrt(sigma2)) + 40
    ks = np.arange(-reach, reach + 1)
    expected = discrete_gaussian_pmf(sigma2, ks) * samples.size
    counts = np.bincount(samples + reach, minlength=ks.size)
    assert counts.size == ks.size, "a sample fell outside +-(40 sigma + 40)"
    obs_bins, exp_bins = [], []
    acc_o, acc_e = 0.0, 0.0
    for o, e in zip(counts, expected, strict=True):
        acc_o += o
        acc_e += e
        if acc_e >= 50:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o, acc_e = 0.0, 0.0
    obs_bins[-1] += acc_o
    exp_bins[-1] += acc_e
    obs, exp = np.array(obs_bins), np.array(exp_bins)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return float(stats.chi2.sf(chi2, df=obs.size - 1))


@pytest.fixture(scope="module")
def draws() -> dict[float, np.ndarray]:
    out = {}
    for i, sigma in enumerate(SIGMAS):
        out[sigma] = discrete_gaussian(
            DeterministicRandom(f"dg-{i}"), sigma2_on_grid(sigma * sigma), N
        )
    return out


@pytest.mark.parametrize("sigma", SIGMAS)
def test_chi_square_goodness_of_fit_against_exact_pmf(
    draws: dict[float, np.ndarray], sigma: float
) -> None:
    assert _chi_square_p(draws[sigma], sigma * sigma) > P_THRESHOLD


@pytest.mark.parametrize("sigma", SIGMAS)
def test_mean_and_variance_within_six_standard_errors(
    draws: dict[float, np.ndarray], sigma: float
) -> None:
    x = draws[sigma].astype(np.float64)
    var, m4 = _exact_moments(sigma * sigma)
    assert abs(x.mean()) <= SE * math.sqrt(var / N)
    sample_var = float((x * x).mean())  # the mean is exactly 0
    assert abs(sample_var - var) <= SE * math.sqrt((m4 - var * var) / N)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_distribution_is_symmetric(draws: dict[float, np.ndarray], sigma: float) -> None:
    x = draws[sigma]
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    # Under symmetry pos ~ Binomial(pos + neg, 1/2).
    assert abs(pos - neg) <= SE * math.sqrt(pos + neg)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_tail_masses_match_exact(draws: dict[float, np.ndarray], sigma: float, k: float) -> None:
    x = draws[sigma]
    cut = math.ceil(k * sigma)
    reach = int(40 * sigma) + 40
    ks = np.arange(-reach, reach + 1)
    pmf = discrete_gaussian_pmf(sigma * sigma, ks)
    p = float(pmf[np.abs(ks) >= cut].sum())
    observed = int((np.abs(x) >= cut).sum())
    assert abs(observed - p * N) <= SE * math.sqrt(N * p * (1 - p)) + 1


def test_sigma_one_thousand_and_above_keep_the_right_scale() -> None:
    for sigma in (1000.0, 100_000.0):
        x = discrete_gaussian(DeterministicRandom(int(sigma)), sigma2_on_grid(sigma**2), 20_000)
        sd = float(x.astype(np.float64).std())
        # sd of 20k draws: relative SE ~ 1/sqrt(2n) = 0.5%; 6 SE = 3%.
        assert abs(sd / sigma - 1.0) < 0.03


def test_python_integer_fallback_lanes_follow_the_same_law() -> None:
    # Force nearly every lane through the Python-integer path.
    sigma2 = Fraction(9)
    x = discrete_gaussian(DeterministicRandom("fallback"), sigma2, 6000, int64_limit=2)
    assert _chi_square_p(x, 9.0) > P_THRESHOLD
    var, m4 = _exact_moments(9.0)
    assert abs(float((x.astype(float) ** 2).mean()) - var) <= SE * math.sqrt((m4 - var**2) / 6000)


@pytest.mark.parametrize(
    ("num", "den"), [(0, 1), (1, 3), (1, 1), (5, 2), (7, 3), (40, 7), (123456789, 98765432)]
)
def test_bernoulli_exp_frequency(num: int, den: int) -> None:
    n = 200_000
    hits = bernoulli_exp(DeterministicRandom(f"b{num}/{den}"), np.full(n, num, np.int64), den)
    p = math.exp(-num / den)
    assert abs(int(hits.sum()) - n * p) <= SE * math.sqrt(n * p * (1 - p)) + 1


def test_scalar_bernoulli_exp_frequency() -> None:
    rng = DeterministicRandom("scalar")
    n = 20_000
    hits = sum(_bern_exp_scalar(rng, 7, 3) for _ in range(n))
    p = math.exp(-7 / 3)
    assert abs(hits - n * p) <= SE * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("bound", [1, 2, 3, 7, 1000, (1 << 40) + 1, (1 << 62) + 12345])
def test_uniform_below_is_in_range_and_unbiased(bound: int) -> None:
    n = 50_000
    u = _uniform_below(DeterministicRandom(bound), bound, n)
    assert u.min() >= 0
    assert int(u.max()) < bound
    if bound > 1:
        # mean of U{0..b-1} is (b-1)/2, variance (b^2-1)/12
        mean = float(u.astype(np.float64).mean())
        sd = math.sqrt((bound * bound - 1) / 12 / n)
        assert abs(mean - (bound - 1) / 2) <= SE * sd


def test_uniform_below_small_bound_chi_square() -> None:
    u = _uniform_below(DeterministicRandom("u7"), 7, 70_000)
    counts = np.bincount(u, minlength=7)
    assert stats.chisquare(counts).pvalue > P_THRESHOLD


def test_discrete_laplace_matches_its_pmf() -> None:
    # scale t/s = 5/2: P[y] ~ exp(-|y| * 2 / 5)
    y = _discrete_laplace(DeterministicRandom("lap"), 5, 2, 100_000)
    ks = np.arange(-60, 61)
    pmf = np.exp(-np.abs(ks) * 2 / 5)
    pmf /= pmf.sum()
    counts = np.bincount(np.clip(y, -60, 60) + 60, minlength=ks.size)
    mask = pmf * y.size >= 20
    obs = np.append(counts[mask], counts[~mask].sum())
    exp = np.append(pmf[mask], pmf[~mask].sum()) * y.size
    assert stats.chisquare(obs, exp).pvalue > P_THRESHOLD


def test_same_seed_gives_same_noise_and_different_seeds_differ() -> None:
    s2 = sigma2_on_grid(25)
    a = discrete_gaussian(DeterministicRandom(1), s2, 1000)
    b = discrete_gaussian(DeterministicRandom(1), s2, 1000)
    c = discrete_gaussian(DeterministicRandom(2), s2, 1000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_extreme_grid_values_sample_without_overflow() -> None:
    from edge_sdk.privacy._sampler import MAX_SIGMA2

    big = discrete_gaussian(DeterministicRandom("max"), Fraction(MAX_SIGMA2), 2000)
    assert abs(float(big.astype(np.float64).std()) / math.sqrt(MAX_SIGMA2) - 1) < 0.15
    tiny = discrete_gaussian(DeterministicRandom("min"), Fraction(1, 1 << 16), 2000)
    assert np.count_nonzero(tiny) == 0  # P[X != 0] ~ 2 exp(-2**15)
    with pytest.raises(ValueError):
        discrete_gaussian(DeterministicRandom(0), Fraction(MAX_SIGMA2 + 1, 2), 5)


def test_size_zero_and_dtype() -> None:
    assert sample_discrete_gaussian(4, 0, DeterministicRandom(0)).shape == (0,)
    assert sample_discrete_gaussian(4, 3, DeterministicRandom(0)).dtype == np.int64


def test_sigma2_grid_rounds_up_and_rejects_bad_values() -> None:
    assert sigma2_on_grid(1) == 1
    g = sigma2_on_grid(0.1)
    assert g >= Fraction(0.1) and g - Fraction(0.1) < Fraction(1, 1 << 16)
    assert g.denominator <= 1 << 16
    big = sigma2_on_grid(2.0**30 + 0.5)
    assert big == 2**30 + 1
    for bad in (0, -1.0, float("nan"), float("inf"), 2.0**47):
        with pytest.raises(ValueError):
            sigma2_on_grid(bad)
    with pytest.raises(ValueError):
        discrete_gaussian(DeterministicRandom(0), Fraction(1, 3), 5)


def test_default_source_is_the_os_csprng() -> None:
    src = noise_mod._resolve_rng(None)
    assert src is randomness.default_random()
    assert isinstance(src, SystemRandom)
    assert src.secure is True
    assert DeterministicRandom(0).secure is False


def test_default_sampling_path_reads_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(randomness.os, "urandom", counting)
    x = sample_discrete_gaussian(16, 1000)
    assert x.shape == (1000,)
    assert sum(calls) >= 8 * 1000  # at least one 64-bit word per sample came from the OS
