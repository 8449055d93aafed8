"""Server optimizers and round planning."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.optimizers import FedAdam, FedAvg, FedAvgM, make_optimizer, mean_delta
from aggregator.planning import build_announcement, choose_scale, plan_rounds
from edge_sdk.errors import ConfigError
from edge_sdk.pipeline import RoundContext
from edge_sdk.privacy import DPPolicy
from edge_sdk.protocol import GlobalModel, model_digest
from tests import test_aggregator_support as _support

keypair = _support.keypair  # session fixture


def test_mean_delta_fixed_denominator() -> None:
    ints = np.array([10, -20, 30])
    np.testing.assert_allclose(mean_delta(ints, scale=10.0, count=2), [0.5, -1.0, 1.5])
    np.testing.assert_allclose(
        mean_delta(ints, scale=10.0, count=2, fixed_denominator=4), [0.25, -0.5, 0.75]
    )


def test_fedavgm_accumulates_velocity_and_round_trips_state() -> None:
    opt = FedAvgM(lr=1.0, momentum=0.5)
    w = np.zeros(2)
    w = opt.step(w, np.array([1.0, 0.0]))
    w = opt.step(w, np.array([1.0, 0.0]))
    np.testing.assert_allclose(w, [1.0 + 1.5, 0.0])
    again = FedAvgM(lr=1.0, momentum=0.5)
    again.load_state(opt.state_bytes())
    np.testing.assert_array_equal(again.step(w, np.ones(2)), opt.step(w, np.ones(2)))


def test_fedadam_first_step_is_sign_scaled() -> None:
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    d = np.array([2.0, -3.0])
    out = opt.step(np.zeros(2), d)
    m, v = 0.1 * d, 0.01 * d * d
    np.testing.assert_allclose(out, 0.1 * m / (np.sqrt(v) + 1e-9))
    clone = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    clone.load_state(opt.state_bytes())
    np.testing.assert_array_equal(clone.step(out, d), opt.step(out, d))


def test_make_optimizer_rejects_unknown() -> None:
    assert isinstance(make_optimizer({"name": "fedavg", "lr": 0.5}), FedAvg)
    with pytest.raises(ConfigError):
        make_optimizer({"name": "sgd"})
    with pytest.raises(ConfigError):
        make_optimizer({"name": "fedavgm", "momentum": 1.5})


def test_state_of_one_optimizer_refused_by_another() -> None:
    with pytest.raises(ValueError):
        FedAdam().load_state(FedAvgM().state_bytes())


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 100.0), st.integers(4, 24), st.floats(0.0, 10.0))
def test_choose_scale_fits_clip_and_noise(clip: float, bits: int, ratio: float) -> None:
    scale = choose_scale(clip=clip, value_bits=bits, sigma_per_unit_scale=ratio)
    assert scale * clip + 6 * ratio * scale <= (1 << (bits - 1)) - 1 + 1e-6


def _model(dim: int) -> GlobalModel:
    w = np.zeros(dim, "<f4").tobytes()
    return GlobalModel(
        federation="f",
        version=0,
        round_id=0,
        parent_digest=bytes(32),
        digest=model_digest(0, bytes(32), w),
        num_params=dim,
        weights=w,
        created_ms=1,
    )


def test_he_only_plan_round_trips_through_device_context(keypair: Any) -> None:
    pk, _ = keypair
    plan = plan_rounds(pk, dimension=100, max_contributors=50, min_clients=5, clip=2.0)
    assert plan.noise is None and plan.privacy_field == b""
    assert plan.packing.scale == pytest.approx(32767 / 2.0)
    ann = build_announcement(
        plan, federation="f", round_id=1, model=_model(100), issued_ms=1, deadline_ms=2
    )
    ctx = RoundContext.from_announcement(ann, pk)
    assert ctx.packing == plan.packing and ann.train_config()["clip"] == 2.0


def test_dp_plan_leaves_room_for_six_sigmas(keypair: Any) -> None:
    pk, _ = keypair
    policy = DPPolicy(
        mode="distributed", epsilon=2.0, delta=1e-5, rounds=10, clip=1.0, min_clients=5
    )
    plan = plan_rounds(
        pk, dimension=1000, max_contributors=100, min_clients=5, clip=1.0, policy=policy
    )
    assert plan.noise is not None
    top = (1 << 15) - 1
    assert plan.packing.scale * 1.0 + 6 * plan.noise.sigma <= top
    # and not wastefully small: within 10% of the bound
    assert plan.packing.scale * 1.0 + 6 * plan.noise.sigma >= 0.9 * top
    ann = build_announcement(
        plan, federation="f", round_id=1, model=_model(1000), issued_ms=1, deadline_ms=2
    )
    ctx = RoundContext.from_announcement(ann, pk)
    assert ctx.noise == plan.noise


def test_policy_quorum_above_round_quorum_refused(keypair: Any) -> None:
    pk, _ = keypair
    policy = DPPolicy(
        mode="distributed", epsilon=2.0, delta=1e-5, rounds=10, clip=1.0, min_clients=10
    )
    with pytest.raises(ConfigError):
        plan_rounds(pk, dimension=10, max_contributors=100, min_clients=5, clip=1.0, policy=policy)
