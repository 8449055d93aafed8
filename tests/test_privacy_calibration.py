"""Calibration and the policy / noise-spec types."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import DecodeError
from edge_sdk.privacy import (
    CalibrationError,
    DPPolicy,
    NoiseSpec,
    calibrate,
    epsilon_spent,
    rounded_norm_bound_sq,
    sigma2_on_grid,
)
from edge_sdk.privacy._sampler import MAX_SIGMA2


@st.composite
def policies(draw: st.DrawFn) -> tuple[DPPolicy, float, int]:
    mode = draw(st.sampled_from(["local", "distributed"]))
    pol = DPPolicy(
        mode=mode,
        epsilon=draw(st.floats(0.05, 50.0)),
        delta=draw(st.sampled_from([1e-3, 1e-5, 1e-7, 1e-9])),
        rounds=draw(st.integers(1, 1000)),
        clip=draw(st.floats(0.01, 10.0)),
        min_clients=draw(st.integers(1, 500)) if mode == "distributed" else 1,
    )
    return pol, draw(st.floats(1.0, 4096.0)), draw(st.integers(1, 200_000))


@settings(max_examples=40, deadline=None)
@given(case=policies())
def test_calibrated_noise_never_overshoots_the_target(case: tuple[DPPolicy, float, int]) -> None:
    policy, scale, dim = case
    try:
        spec = calibrate(policy, scale=scale, dimension=dim)
    except CalibrationError:
        # legitimate only if even the largest supported sigma^2 misses the target
        top = NoiseSpec(
            mode=policy.mode,
            sigma2_num=MAX_SIGMA2,
            sigma2_den=1,
            norm_bound_sq=rounded_norm_bound_sq(policy.clip, scale, dim),
            dimension=dim,
            min_clients=policy.min_clients,
            scale=scale,
            clip=policy.clip,
            delta=policy.delta,
            rounds=policy.rounds,
            epsilon_target=policy.epsilon,
        )
        assert epsilon_spent(top, policy.rounds) > policy.epsilon
        return
    achieved = epsilon_spent(spec, policy.rounds)
    assert achieved <= policy.epsilon
    # ...and is tight: one grid step less noise would overshoot (or sigma is at its floor).
    smaller = sigma2_on_grid(float(spec.sigma2) * (1 - 1e-5))
    if smaller < spec.sigma2 and float(spec.sigma2) > 0.25 + 1e-3:
        less = replace(spec, sigma2_num=smaller.numerator, sigma2_den=smaller.denominator)
        assert epsilon_spent(less, policy.rounds) > policy.epsilon * (1 - 1e-3)


def test_local_calibration_matches_the_gaussian_reference() -> None:
    # (1, 1e-5) for one release: the analytic Gaussian needs sigma/sensitivity = 3.7306;
    # the device's RDP-based calibration asks for somewhat more (never less).
    pol = DPPolicy(mode="local", epsilon=1.0, delta=1e-5, rounds=1, clip=1.0)
    spec = calibrate(pol, scale=10_000.0, dimension=1)
    ratio = spec.sigma / (2 * spec.norm_bound)
    assert 3.7306 < ratio < 3.7306 * 1.15


def test_more_rounds_need_more_noise() -> None:
    base = dict(mode="distributed", epsilon=1.0, delta=1e-5, clip=1.0, min_clients=100)
    few = calibrate(DPPolicy(rounds=10, **base), scale=256.0, dimension=1000)  # type: ignore[arg-type]
    many = calibrate(DPPolicy(rounds=1000, **base), scale=256.0, dimension=1000)  # type: ignore[arg-type]
    assert many.sigma2 > few.sigma2


def test_distributed_noise_per_device_shrinks_with_min_clients() -> None:
    base = dict(mode="distributed", epsilon=1.0, delta=1e-5, clip=1.0, rounds=50)
    s10 = calibrate(DPPolicy(min_clients=10, **base), scale=256.0, dimension=1000)  # type: ignore[arg-type]
    s1000 = calibrate(DPPolicy(min_clients=1000, **base), scale=256.0, dimension=1000)  # type: ignore[arg-type]
    assert s1000.sigma2 < s10.sigma2 / 50


def test_unreachable_target_raises() -> None:
    pol = DPPolicy(mode="local", epsilon=1e-3, delta=1e-9, rounds=1000, clip=100.0)
    with pytest.raises(CalibrationError, match="out of reach"):
        calibrate(pol, scale=1e6, dimension=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "central"},
        {"epsilon": 0.0},
        {"epsilon": float("inf")},
        {"delta": 0.0},
        {"delta": 1.0},
        {"rounds": 0},
        {"rounds": 1.5},
        {"clip": -1.0},
        {"min_clients": 0},
        {"mode": "local", "min_clients": 5},
        {"rounding_beta": 1.0},
    ],
)
def test_policy_validates(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = dict(
        mode="distributed", epsilon=1.0, delta=1e-5, rounds=10, clip=1.0, min_clients=10
    )
    base.update(kwargs)
    with pytest.raises(ValueError):
        DPPolicy(**base)  # type: ignore[arg-type]


def _spec() -> NoiseSpec:
    pol = DPPolicy(mode="distributed", epsilon=1.0, delta=1e-5, rounds=10, clip=1.0, min_clients=10)
    return calibrate(pol, scale=128.0, dimension=500)


def test_noise_spec_round_trips_through_json() -> None:
    spec = _spec()
    assert NoiseSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(kind="other"), "kind"),
        (lambda d: d.update(mechanism="laplace"), "mechanism"),
        (lambda d: d.update(extra=1), "unknown"),
        (lambda d: d.pop("sigma2_num"), "missing"),
        (lambda d: d.update(sigma2_den=3), "power of two"),
        (lambda d: d.update(sigma2_den=1 << 20), "sigma2_den"),
        (lambda d: d.update(sigma2_num=0), "sigma2_num"),
        (lambda d: d.update(sigma2_num=2, sigma2_den=4), "lowest terms"),
        (lambda d: d.update(dimension=0), "dimension"),
        (lambda d: d.update(dimension=True), "dimension"),
        (lambda d: d.update(scale=float("nan")), "scale"),
        (lambda d: d.update(delta=1.5), "delta"),
        (lambda d: d.update(norm_bound_sq="9"), "norm_bound_sq"),
    ],
)
def test_noise_spec_rejects_invalid_wire_data(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    d = _spec().to_dict()
    mutate(d)
    with pytest.raises(DecodeError, match=reason):
        NoiseSpec.from_dict(d)


def test_noise_spec_from_non_dict() -> None:
    with pytest.raises(DecodeError):
        NoiseSpec.from_dict([1, 2])
