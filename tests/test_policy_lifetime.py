"""The pinned policy's epsilon is a device's total, across every announcement.

Found by an internal review: every announcement was checked on its own
(its noise against its own target over its own horizon), so an aggregator
re-planning every round for ``rounds = 1`` at the policy's epsilon made each
round spend the whole budget, capped only by the device's own
``budget_epsilon`` (default 8). ``FederationPolicy.check_lifetime``, run by
the device agent before it trains, composes the device's ledger plus the
round at the policy's delta.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import BudgetExhaustedError
from edge_sdk.policy import FederationPolicy
from edge_sdk.privacy import DPPolicy, PrivacyLedger, calibrate, cost_of

POLICY_EPS = 1.0


def _policy() -> FederationPolicy:
    return FederationPolicy(
        federation="fed",
        key_fingerprint="00" * 32,
        committee_fingerprint="11" * 32,
        threshold=2,
        holders=(("keyholder-1", b"\x01" * 32), ("keyholder-2", b"\x02" * 32)),
        mode="distributed",
        min_clients=10,
        epsilon=POLICY_EPS,
        delta=1e-6,
        rounds=10,
        max_clip=1.0,
    )


def _cost(rounds: int) -> object:
    spec = calibrate(
        DPPolicy(
            mode="distributed",
            epsilon=POLICY_EPS,
            delta=1e-6,
            rounds=rounds,
            clip=1.0,
            min_clients=10,
        ),
        scale=64.0,
        dimension=50,
    )
    return cost_of(spec)


def _run(tmp_path: Path, cost: object, attempts: int) -> int:
    policy = _policy()
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget_epsilon=8.0, delta=1e-6)
    taken = 0
    for r in range(attempts):
        try:
            policy.check_lifetime(ledger, cost)
        except BudgetExhaustedError as exc:
            assert "federation policy's total" in str(exc)
            break
        ledger.check(cost)  # the device's own budget (8) would allow far more
        ledger.record(f"fed/{r}", cost, idempotency_key=str(r))  # type: ignore[arg-type]
        taken += 1
    assert ledger.epsilon_if(cost, delta=policy.delta) > POLICY_EPS  # the next one is refused
    assert ledger.spent() <= POLICY_EPS * (1 + 1e-9)
    return taken


def test_replanning_every_round_for_one_round_stops_at_the_policys_total(tmp_path: Path) -> None:
    # each announcement alone would pass check_noise: its own target is the policy's epsilon
    assert _run(tmp_path, _cost(rounds=1), attempts=40) == 1


def test_an_honest_schedule_takes_its_whole_horizon(tmp_path: Path) -> None:
    taken = _run(tmp_path, _cost(rounds=10), attempts=40)
    assert 10 <= taken < 40  # the calibrated horizon fits; the cap still ends it


def test_the_cap_is_stated_at_the_policys_delta_not_the_ledgers(tmp_path: Path) -> None:
    policy = _policy()
    cost = _cost(rounds=10)
    loose = PrivacyLedger(tmp_path / "l.json", budget_epsilon=8.0, delta=1e-2)
    # at delta 1e-2 the ledger sees a smaller epsilon than the policy's delta 1e-6 gives
    assert loose.epsilon_if(cost) < loose.epsilon_if(cost, delta=policy.delta)  # type: ignore[arg-type]
    with pytest.raises(BudgetExhaustedError):
        for r in range(40):
            policy.check_lifetime(loose, cost)
            loose.record(f"fed/{r}", cost, idempotency_key=str(r))  # type: ignore[arg-type]


def test_model_noise_below_the_mechanisms_floor_is_refused() -> None:
    # Found by review: extra slots had the distributed-mode floor (sigma2 >= 1/4,
    # where the sum bound is stated); the model noise did not.
    import dataclasses

    from edge_sdk.errors import RemoteProtocolError
    from edge_sdk.privacy import calibrate

    honest = calibrate(
        DPPolicy(
            mode="distributed",
            epsilon=POLICY_EPS,
            delta=1e-6,
            rounds=10,
            clip=1.0,
            min_clients=10,
        ),
        scale=64.0,
        dimension=50,
    )
    _policy().check_noise(honest, value_bits=16)
    thin = dataclasses.replace(honest, sigma2_num=1, sigma2_den=8)
    with pytest.raises(RemoteProtocolError, match="below 1/4"):
        _policy().check_noise(thin, value_bits=16)
