"""Adaptive clipping (Andrew et al. 2021) under encryption and DP (issue 17).

The device pipeline computes and noises each device's clipped-or-not bit;
the aggregator moves the clip geometrically from the noised fraction; the
signed federation policy bounds the clip, and both the device and every
committee member refuse an announcement outside it. Real 2048-bit
committee key, real round machine and members.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest

from aggregator.keyholder import exchange
from aggregator.keyholder_config import PolicyTerms
from aggregator.optimizers import FedAvg
from aggregator.planning import AdaptiveClipPlan, RoundPlan, build_announcement, plan_rounds
from aggregator.rounds import (
    Commit,
    KeyholderAnswered,
    MessageReceived,
    RequestDecryption,
    RoundConfig,
    RoundMachine,
    Snapshot,
    Start,
    round_metrics,
)
from edge_sdk.crypto import generate_keypair
from edge_sdk.errors import RemoteProtocolError
from edge_sdk.extras import CLIP_BELOW, clip_slot, federated_metrics
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, build_update, privatize
from edge_sdk.policy import FederationPolicy
from edge_sdk.privacy import DPPolicy, rounded_norm_bound_sq, sigma2_on_grid
from edge_sdk.protocol import GlobalModel, KeyholderRequest, model_digest
from edge_sdk.randomness import DeterministicRandom
from firmware_sim.committee import InMemoryCommittee
from firmware_sim.engine import SimConfig, run
from tests.test_aggregator_support import SAFE_PRIMES, update_messages

FED = "adaptfed"
DIM = 16
QUORUM = 3
TERMS = PolicyTerms(
    mode="distributed",
    min_clients=QUORUM,
    epsilon=8.0,
    delta=1e-5,
    rounds=10,
    max_clip=1.0,
    min_clip=0.05,
    adaptive_clip=True,
)
ADAPTIVE = AdaptiveClipPlan(initial_clip=0.1, min_clip=0.05, max_clip=1.0, bit_noise=4.0)


@pytest.fixture(scope="module")
def committee() -> InMemoryCommittee:
    return InMemoryCommittee(FED, primes=SAFE_PRIMES)


def _plan(pk: Any, clip: float, adaptive: AdaptiveClipPlan | None = ADAPTIVE) -> RoundPlan:
    return plan_rounds(
        pk,
        dimension=DIM,
        max_contributors=16,
        min_clients=QUORUM,
        clip=clip,
        policy=DPPolicy(
            mode="distributed", epsilon=8.0, delta=1e-5, rounds=10, clip=clip, min_clients=QUORUM
        ),
        adaptive=adaptive,
    )


def _model(dim: int = DIM) -> GlobalModel:
    weights = bytes(4 * dim)
    return GlobalModel(
        federation=FED,
        version=0,
        round_id=0,
        parent_digest=bytes(32),
        digest=model_digest(0, bytes(32), weights),
        num_params=dim,
        weights=weights,
        created_ms=1,
    )


def _request(plan: RoundPlan) -> KeyholderRequest:
    return KeyholderRequest(
        federation=FED,
        round_id=1,
        request_id="r1",
        packing=plan.packing.to_bytes(),
        packing_digest=plan.packing.digest(),
        privacy=plan.privacy_field,
        contributors=b"",
        encrypted_sum=b"\x01" * plan.public_key.ciphertext_bytes,
        issued_ms=1,
    )


def _announce(plan: RoundPlan) -> Any:
    return build_announcement(
        plan, federation=FED, round_id=1, model=_model(), issued_ms=1, deadline_ms=10**9
    )


# -- convergence to the target quantile ------------------------------------------------


@pytest.mark.parametrize(
    ("gamma", "devices", "rounds"),
    [
        (0.5, 60, 150),
        pytest.param(0.3, 200, 300, marks=(pytest.mark.slow, pytest.mark.timeout(1800))),
        pytest.param(0.8, 200, 300, marks=(pytest.mark.slow, pytest.mark.timeout(1800))),
    ],
)
def test_the_clip_converges_to_the_target_quantile_of_log_normal_norms(
    gamma: float, devices: int, rounds: int
) -> None:
    """Norms ~ LogNormal(mu, s): the gamma-quantile is exp(mu + s * Phi^-1(gamma)).

    Each round fresh devices run the real pipeline: it clips, computes the
    bit and adds its discrete Gaussian noise (sum noise 2 sigma_b units,
    sigma_b = 4 bits); the totals go through the aggregator's own decoding
    and geometric update. The average log clip of the last third of the
    rounds must be within 0.12 of the log quantile (13 % in the clip); the
    stationary spread of the average is a few hundredths at these sizes.
    """
    mu, s = math.log(0.5), 0.6
    truth = math.exp(mu + s * NormalDist().inv_cdf(gamma))
    plan = AdaptiveClipPlan(
        target_quantile=gamma,
        lr=0.2,
        initial_clip=0.05,
        min_clip=1e-3,
        max_clip=10.0,
        bit_noise=4.0,
    )
    bit = clip_slot(sigma2_on_grid((2 * 4.0) ** 2 / devices))
    ctx = _context_with(bit)
    norms_rng = np.random.default_rng(int(gamma * 100))
    noise_rng = DeterministicRandom(f"adaptive-{gamma}")
    clip = plan.initial_clip
    history = []
    for _ in range(rounds):
        norms = np.exp(norms_rng.normal(mu, s, devices))
        total = 0
        for norm in norms:
            delta = np.zeros(4)
            delta[0] = norm
            out = privatize(delta, ctx, clip=clip, rng=noise_rng, allow_insecure_rng=True)
            total += int(out.values[-1])
        fraction = federated_metrics({CLIP_BELOW: total}, ctx.packing, count=devices)
        assert fraction.clip_fraction is not None
        clip = plan.next_clip(clip, fraction.clip_fraction)
        history.append(math.log(clip))
    assert abs(float(np.mean(history[-(rounds // 3) :])) - math.log(truth)) < 0.12


def _context_with(bit: Any) -> RoundContext:
    pk = _PK
    base = plan_rounds(pk, dimension=4, max_contributors=1000, min_clients=1, clip=1.0)
    plan = dataclasses.replace(base, packing=base.packing.with_extras([bit]))
    ann = build_announcement(
        plan, federation=FED, round_id=1, model=_model(4), issued_ms=1, deadline_ms=2
    )
    return RoundContext.from_announcement(ann, pk)


_PK = generate_keypair(2048)[0]


def test_the_bit_is_computed_by_the_device_from_its_own_norm() -> None:
    ctx = _context_with(clip_slot())
    rng = DeterministicRandom("bit")
    small = privatize(np.full(4, 0.1), ctx, clip=1.0, rng=rng, allow_insecure_rng=True)
    large = privatize(
        np.full(4, 1.0), ctx, clip=1.0, extras={CLIP_BELOW: 1.0}, rng=rng, allow_insecure_rng=True
    )
    assert small.values[-1] == 1 and large.values[-1] == -1  # the caller's claim is ignored
    assert large.clipped and not small.clipped


def test_next_clip_stays_within_the_configured_range() -> None:
    plan = AdaptiveClipPlan(initial_clip=0.1, min_clip=0.05, max_clip=0.2, lr=5.0)
    assert plan.next_clip(0.1, 1.0) == 0.05
    assert plan.next_clip(0.1, -3.0) == 0.2


# -- the policy bounds the clip: device and members ---------------------------------------


def test_device_and_members_refuse_a_clip_above_or_below_the_policy(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    policy = committee.policy(TERMS)
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    members = committee.members(registry, min_clients=1, policy=policy)
    pk = committee.public_key
    for clip in (2.0, 0.01):
        plan = _plan(pk, clip)
        with pytest.raises(RemoteProtocolError, match="clip") as info:
            RoundContext.from_announcement(_announce(plan), pk, policy=policy)
        assert info.value.reason == "outside_policy"
        assert {m.handle(_request(plan)).reason for m in members} == {"outside_policy"}
    # within the range it is accepted by the device
    ctx = RoundContext.from_announcement(_announce(_plan(pk, 0.3)), pk, policy=policy)
    assert ctx.clip == 0.3 and ctx.packing.extra_index(CLIP_BELOW) is not None


def test_the_bit_is_refused_when_the_policy_allows_no_adaptive_clip(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    policy = committee.policy(dataclasses.replace(TERMS, adaptive_clip=False))
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    members = committee.members(registry, min_clients=1, policy=policy)
    plan = _plan(committee.public_key, 0.3)
    with pytest.raises(RemoteProtocolError, match="adaptive") as info:
        RoundContext.from_announcement(_announce(plan), committee.public_key, policy=policy)
    assert info.value.reason == "outside_policy"
    assert {m.handle(_request(plan)).reason for m in members} == {"outside_policy"}


def test_noise_lowered_relative_to_the_clip_is_refused(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    policy = committee.policy(TERMS)
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    members = committee.members(registry, min_clients=1, policy=policy)
    honest = _plan(committee.public_key, 0.3)
    assert honest.noise is not None
    # the clip raised to 1.0 (inside the policy) but the clip-0.3 noise kept
    noise = honest.noise
    raised = dataclasses.replace(
        noise, clip=1.0, norm_bound_sq=rounded_norm_bound_sq(1.0, noise.scale, DIM)
    )
    lowered = dataclasses.replace(honest, noise=raised)
    with pytest.raises(RemoteProtocolError, match="too little noise") as info:
        RoundContext.from_announcement(_announce(lowered), committee.public_key, policy=policy)
    assert info.value.reason == "outside_policy"
    assert {m.handle(_request(lowered)).reason for m in members} == {"outside_policy"}


def test_policy_fields_are_signed_and_absent_fields_keep_old_digests(
    committee: InMemoryCommittee,
) -> None:
    plain = committee.policy(dataclasses.replace(TERMS, min_clip=None, adaptive_clip=False))
    assert "min_clip" not in plain.to_json() and "adaptive_clip" not in plain.to_json()
    adaptive = committee.policy(TERMS)
    assert adaptive.digest != plain.digest
    adaptive.verify()
    loosened = dataclasses.replace(adaptive, min_clip=0.001)
    with pytest.raises(Exception, match="signatures"):
        loosened.verify()
    assert FederationPolicy.from_json(adaptive.to_json()) == adaptive


# -- the round machine moves the clip and devices follow it -------------------------------


def test_the_machine_moves_the_clip_from_the_released_bits_and_devices_accept_it(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    pk = committee.public_key
    policy = committee.policy(TERMS)
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    devices = {f"d{i}": DeviceIdentity.generate(f"d{i}") for i in range(4)}
    for ident in devices.values():
        registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
    committee.approve_all(registry)
    manifest = committee.manifest
    registry.require_approvals(
        {h.holder_id: h.public_key for h in manifest.holders}, manifest.threshold
    )
    members = committee.members(registry, min_clients=1, policy=policy)
    machine = RoundMachine(
        RoundConfig(federation=FED, min_clients=QUORUM, target_clients=4, round_duration_ms=60_000),
        _plan(pk, ADAPTIVE.initial_clip),
        registry,
        FedAvg(),
        initial_weights=np.zeros(DIM, np.float32),
        committee=committee.verifier(),
        binding=policy.djn_base,
    )

    done: list[Any] = []
    opened: list[Any] = []

    def feed(event: Any) -> None:
        for action in machine.handle(event):
            if isinstance(action, Commit):
                done.extend(r for r in action.records if r.phase == "done")
                opened.extend(r for r in action.records if r.phase == "collecting")
            if isinstance(action, RequestDecryption):
                for result in exchange(members, action.request):
                    feed(KeyholderAnswered(result=result, now_ms=5_000))

    feed(Start(now_ms=1_000))
    clips = [machine.clip]
    fractions = []
    for round_id in (1, 2):
        ann = machine.announcement
        ctx = RoundContext.from_announcement(ann, pk, policy=policy)
        assert ctx.clip == clips[-1]
        for name, ident in devices.items():
            delta = np.random.default_rng(round_id).normal(0, 0.001, DIM)  # all unclipped
            update, private = build_update(
                delta,
                ctx,
                ident,
                rng=DeterministicRandom(f"{round_id}{name}"),
                allow_insecure_rng=True,
                now_ms=2_000,
            )
            assert private.extras[CLIP_BELOW] == 1
            for topic, payload in update_messages(update):
                for member in members:
                    member.witness(topic, payload)
                feed(MessageReceived(topic=topic, payload=payload, now_ms=2_000))
        assert machine.model is not None and machine.model.version == round_id
        assert machine.last_metrics is not None and machine.last_metrics.clip_fraction is not None
        fractions.append(machine.last_metrics.clip_fraction)
        clips.append(machine.clip)
    # the next clip is the geometric update of the released (noised) fraction,
    # kept within the range the policy allows
    for before, fraction, after in zip(clips, fractions, clips[1:], strict=False):
        assert after == ADAPTIVE.next_clip(before, fraction) and after != before
    assert all(TERMS.min_clip <= c <= TERMS.max_clip for c in clips)  # type: ignore[operator]
    # what `edgefl status` shows is decoded from the stored record alone
    stored = [round_metrics(r) for r in done]
    assert [m.clip_fraction for m in stored if m is not None] == fractions
    # a restarted aggregator resumes the moved clip from its stored announcement
    assert opened and machine.model is not None
    restarted = RoundMachine(
        RoundConfig(federation=FED, min_clients=QUORUM, target_clients=4, round_duration_ms=60_000),
        _plan(pk, ADAPTIVE.initial_clip),
        registry,
        FedAvg(),
        committee=committee.verifier(),
        binding=policy.djn_base,
    )
    restarted.restore(
        Snapshot(
            current=opened[-1],
            sum_blob=b"",
            count=0,
            accepted=(),
            model=machine.model,
            optimizer_state=machine.optimizer.state_bytes(),
        )
    )
    restarted.handle(Start(now_ms=9_000))
    assert restarted.clip == machine.clip
    assert restarted.announcement == machine.announcement


# -- the utility setting ----------------------------------------------------------------


def test_dp_adaptive_sim_moves_the_clip_and_stays_within_the_budget() -> None:
    cfg = SimConfig(devices=20, rounds=6, setting="dp_adaptive", adaptive_initial_clip=0.05)
    result = run(cfg, insecure_seed=5)
    clips = [r.clip for r in result.rounds]
    assert all(r.outcome == "ok" for r in result.rounds)
    assert clips[0] == 0.05 and len(set(clips)) == len(clips)  # it moved every round
    assert result.rounds[-1].epsilon <= cfg.epsilon * 1.0001
