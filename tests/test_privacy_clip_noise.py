"""Clipping and adding noise to a quantized update."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_sdk.errors import PrivacyError
from edge_sdk.privacy import (
    DPPolicy,
    NonFiniteUpdateError,
    NormBoundExceededError,
    add_noise,
    calibrate,
    clip_l2,
    rounded_norm_bound_sq,
    squared_norm,
    within_norm_bound,
)
from edge_sdk.randomness import DeterministicRandom

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@settings(max_examples=300, deadline=None)
@given(
    delta=hnp.arrays(np.float64, st.integers(0, 200), elements=finite),
    clip=st.floats(min_value=1e-6, max_value=1e6),
)
def test_clipping_always_yields_norm_at_most_c(delta: np.ndarray, clip: float) -> None:
    clipped, norm = clip_l2(delta, clip)
    assert float(np.linalg.norm(clipped)) <= clip
    assert math.isfinite(norm) or norm == math.inf


@settings(max_examples=100, deadline=None)
@given(
    delta=hnp.arrays(
        np.float64, st.integers(1, 50), elements=st.floats(-1e3, 1e3, allow_nan=False)
    ),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
def test_clipping_keeps_direction_and_short_vectors(delta: np.ndarray, clip: float) -> None:
    clipped, norm = clip_l2(delta, clip)
    assert norm == pytest.approx(math.hypot(*delta.tolist()), rel=1e-12)  # robust reference
    if norm <= clip:
        assert np.array_equal(clipped, delta)
    else:
        assert np.allclose(clipped * (norm / clip), delta, rtol=1e-9, atol=1e-12)


def test_clipping_zero_delta_is_safe() -> None:
    clipped, norm = clip_l2(np.zeros(10), 1.0)
    assert norm == 0.0 and np.array_equal(clipped, np.zeros(10))


def test_clipping_huge_finite_entries_does_not_overflow() -> None:
    clipped, norm = clip_l2(np.array([1e308, 1e308]), 2.0)
    assert math.isfinite(norm) and norm > 1e308
    assert float(np.linalg.norm(clipped)) <= 2.0
    assert clipped[0] == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_clipping_rejects_non_finite_with_a_clear_error(bad: float) -> None:
    with pytest.raises(NonFiniteUpdateError, match="NaN/inf"):
        clip_l2(np.array([1.0, bad, 2.0]), 1.0)
    assert issubclass(NonFiniteUpdateError, PrivacyError)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_clipping_rejects_bad_clip(clip: float) -> None:
    with pytest.raises(ValueError, match="clip"):
        clip_l2(np.ones(3), clip)


def _spec(d: int = 200, scale: float = 100.0):
    pol = DPPolicy(mode="distributed", epsilon=2.0, delta=1e-5, rounds=10, clip=1.0, min_clients=20)
    return calibrate(pol, scale=scale, dimension=d)


def _quantize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Test-only stochastic rounding (the device uses the crypto codec's).
    lo = np.floor(x)
    return (lo + (rng.random(x.size) < (x - lo))).astype(np.int64)


def test_rounded_norm_bound_holds_for_stochastic_rounding_mostly() -> None:
    spec = _spec()
    rng = np.random.default_rng(0)
    ok = 0
    for _ in range(400):
        v = rng.normal(size=spec.dimension)
        clipped, _ = clip_l2(v * 10, spec.clip)
        ok += within_norm_bound(_quantize(clipped * spec.scale, rng), spec)
    # each try fails with probability <= beta = e^-0.5 ~ 0.61 by KLS; in practice far less
    assert ok >= 400 * (1 - math.exp(-0.5))


def test_loose_bound_is_deterministic() -> None:
    # (c + sqrt(d))^2 is never exceeded: |rounding error| < 1 per coordinate.
    c, d = 3.0, 16
    bound = rounded_norm_bound_sq(1.0, c, d, beta=1e-300)
    assert bound == math.floor((c + 4.0) ** 2)


def test_add_noise_adds_exact_integer_noise_and_keeps_input() -> None:
    spec = _spec()
    ints = np.zeros(spec.dimension, dtype=np.int64)
    ints[:4] = [10, -3, 0, 7]
    before = ints.copy()
    out = add_noise(ints, spec, DeterministicRandom(5), allow_insecure_rng=True)
    again = add_noise(ints, spec, DeterministicRandom(5), allow_insecure_rng=True)
    assert out.dtype == np.int64 and np.array_equal(ints, before)
    assert np.array_equal(out, again)
    noise = out - ints
    assert abs(float(noise.std()) / spec.sigma - 1.0) < 0.25


def test_add_noise_refuses_insecure_source_without_opt_in() -> None:
    spec = _spec()
    with pytest.raises(ValueError, match="insecure"):
        add_noise(np.zeros(spec.dimension, np.int64), spec, DeterministicRandom(1))


def test_add_noise_default_path_works_with_os_randomness() -> None:
    spec = _spec()
    a = add_noise(np.zeros(spec.dimension, np.int64), spec)
    b = add_noise(np.zeros(spec.dimension, np.int64), spec)
    assert not np.array_equal(a, b)


def test_add_noise_rejects_update_beyond_norm_bound() -> None:
    spec = _spec()
    ints = np.zeros(spec.dimension, dtype=np.int64)
    ints[0] = math.isqrt(spec.norm_bound_sq) + 1
    with pytest.raises(NormBoundExceededError, match="re-round"):
        add_noise(ints, spec, DeterministicRandom(1), allow_insecure_rng=True)


def test_add_noise_checks_dtype_and_shape() -> None:
    spec = _spec()
    with pytest.raises(TypeError):
        add_noise(np.zeros(spec.dimension), spec)
    with pytest.raises(ValueError, match="coordinates"):
        add_noise(np.zeros(spec.dimension + 1, np.int64), spec)
    with pytest.raises(ValueError, match="1-D"):
        add_noise(np.zeros((2, spec.dimension), np.int64), spec)


def test_squared_norm_is_exact_for_large_values() -> None:
    v = np.array([2**40, -(2**40), 3], dtype=np.int64)
    assert squared_norm(v) == 2 * 2**80 + 9
    assert squared_norm(np.arange(5, dtype=np.int64)) == 30
