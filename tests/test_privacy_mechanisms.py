"""Contract suite over every entry of the DP mechanism registry.

Each entry must: be what specs dispatch to (sampler and cost are looked up,
never hard-coded); draw exactly from its stated distribution (statistical
check against its own pmf, fixed seed, false-alarm rate about 1e-6 per
point); never report a cost below the continuous Gaussian reference of the
same variance; and calibrate so the accountant never overshoots the target.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from edge_sdk.privacy import DPPolicy, NoiseSpec, add_noise, calibrate, cost_of, epsilon_spent
from edge_sdk.privacy import mechanisms as mech
from edge_sdk.privacy.accounting import ALPHAS
from edge_sdk.randomness import DeterministicRandom

ENTRIES = sorted(mech.REGISTRY)


def _spec(name: str, *, mode: str = "distributed", sigma2: Fraction = Fraction(9)) -> NoiseSpec:
    return NoiseSpec(
        mechanism=name,
        mode=mode,  # type: ignore[arg-type]
        sigma2_num=sigma2.numerator,
        sigma2_den=sigma2.denominator,
        norm_bound_sq=400,
        dimension=16,
        min_clients=10 if mode == "distributed" else 1,
        scale=100.0,
        clip=0.2,
        delta=1e-5,
        rounds=10,
        epsilon_target=8.0,
    )


def test_unknown_mechanisms_are_refused_everywhere() -> None:
    with pytest.raises(ValueError, match="mechanism must be one of"):
        _spec("laplace_float")
    with pytest.raises(ValueError, match="mechanism must be one of"):
        DPPolicy(mode="local", epsilon=1, delta=1e-5, rounds=1, clip=1, mechanism="nope")


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_is_complete_and_exact(name: str) -> None:
    entry = mech.mechanism(name)
    assert entry.name == name and entry.exact and entry.description


@pytest.mark.parametrize("name", ENTRIES)
def test_add_noise_and_cost_dispatch_through_the_registry(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = mech.REGISTRY[name]
    calls: list[str] = []

    def sample(rng: Any, sigma2: Fraction, size: int) -> Any:
        calls.append("sample")
        return np.full(size, 7, dtype=np.int64)

    def cost(noise: NoiseSpec) -> Any:
        calls.append("cost")
        return entry.cost(noise)

    import dataclasses

    monkeypatch.setitem(mech.REGISTRY, name, dataclasses.replace(entry, sample=sample, cost=cost))
    spec = _spec(name)
    out = add_noise(
        np.zeros(16, np.int64), spec, DeterministicRandom(b"x"), allow_insecure_rng=True
    )
    assert np.all(out == 7)
    cost_of(spec)
    assert calls == ["sample", "cost"]


@pytest.mark.parametrize("name", ENTRIES)
@pytest.mark.parametrize("sigma2", [Fraction(1, 2), Fraction(4), Fraction(81, 2)])
def test_sampler_matches_its_own_pmf(name: str, sigma2: Fraction) -> None:
    entry = mech.REGISTRY[name]
    n = 60_000
    draws = entry.sample(DeterministicRandom(b"contract" + str(sigma2).encode()), sigma2, n)
    assert draws.dtype == np.int64
    support = np.arange(-3, 4, dtype=np.int64) * max(1, int(math.sqrt(float(sigma2))))
    pmf = entry.pmf(float(sigma2), support)
    for value, p in zip(support, pmf, strict=True):
        freq = float(np.mean(draws == value))
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(freq - p) <= 5 * sd + 1e-4, (value, freq, p)  # ~1e-6 false alarms


@pytest.mark.parametrize("name", ENTRIES)
@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_cost_is_never_below_the_continuous_gaussian_reference(name: str, mode: str) -> None:
    for sigma2 in (Fraction(1, 4), Fraction(2), Fraction(50), Fraction(4000)):
        spec = _spec(name, mode=mode, sigma2=sigma2)
        cost = cost_of(spec)
        b2 = float(spec.norm_bound_sq)
        if mode == "local":  # one update, sensitivity 2B
            reference = ALPHAS * 4.0 * b2 / (2.0 * float(sigma2))
        else:  # the sum of min_clients updates, sensitivity B
            reference = ALPHAS * b2 / (2.0 * spec.min_clients * float(sigma2))
        assert np.all(cost.central.at(ALPHAS) >= reference * (1 - 1e-12))


@pytest.mark.parametrize("name", ENTRIES)
@pytest.mark.parametrize(
    ("mode", "epsilon", "min_clients"),
    [("local", 50.0, 1), ("distributed", 8.0, 20), ("distributed", 1.0, 1000)],
)
def test_calibration_never_overshoots(
    name: str, mode: str, epsilon: float, min_clients: int
) -> None:
    policy = DPPolicy(
        mode=mode,  # type: ignore[arg-type]
        epsilon=epsilon,
        delta=1e-5,
        rounds=20,
        clip=1.0,
        min_clients=min_clients,
        mechanism=name,
    )
    spec = calibrate(policy, scale=300.0, dimension=650)
    assert spec.mechanism == name
    assert spec.sigma2 >= mech.REGISTRY[name].min_sigma2(mode)
    assert epsilon_spent(spec, policy.rounds) <= epsilon
