"""3072-bit keys end to end: ceremony, DJN base, bound updates, committee decryption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aggregator.keyholder import exchange
from aggregator.keyholder_config import PolicyTerms
from aggregator.optimizers import FedAvg
from aggregator.planning import plan_rounds
from aggregator.rounds import (
    KeyholderAnswered,
    MessageReceived,
    RequestDecryption,
    RoundConfig,
    RoundMachine,
    Start,
    round_outcome,
)
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, build_update
from edge_sdk.randomness import DeterministicRandom
from firmware_sim.committee import InMemoryCommittee
from tests.test_aggregator_support import update_messages

_KEYS = json.loads((Path(__file__).parent / "vectors" / "crypto_test_keys.json").read_text())
PRIMES = (int(_KEYS["safe3072"]["p"]), int(_KEYS["safe3072"]["q"]))
FED = "fed3072"
DIM = 200


def test_a_3072_bit_round_decrypts_exactly_with_binding(tmp_path: Path) -> None:
    committee = InMemoryCommittee(FED, bits=3072, primes=PRIMES)
    pk = committee.public_key
    assert pk.bits == 3072
    policy = committee.policy(PolicyTerms(mode="none", min_clients=3))
    assert policy.djn_base is not None and policy.djn_base.exponent_bits >= 1536
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    idents = [DeviceIdentity.generate(f"d{i}") for i in range(3)]
    for ident in idents:
        registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
    committee.approve_all(registry)
    plan = plan_rounds(pk, dimension=DIM, max_contributors=16, min_clients=3, clip=1.0)
    assert plan.packing.slots_per_plaintext > 78  # more slots per plaintext than at 2048
    machine = RoundMachine(
        RoundConfig(federation=FED, min_clients=3, target_clients=3, round_duration_ms=60_000),
        plan,
        registry,
        FedAvg(),
        initial_weights=np.zeros(DIM, np.float32),
        committee=committee.verifier(),
        binding=policy.djn_base,
    )
    members = committee.members(registry, min_clients=3, policy=policy)
    machine.handle(Start(now_ms=1))
    ann = machine.announcement
    assert ann is not None
    ctx = RoundContext.from_announcement(ann, pk, policy=policy)
    values = []
    requests = []
    for i, ident in enumerate(idents):
        delta = np.random.default_rng(i).normal(0, 0.02, DIM)
        update, private = build_update(
            delta,
            ctx,
            ident,
            clip=1.0,
            rng=DeterministicRandom(bytes([i]) * 8),
            allow_insecure_rng=True,
        )
        assert update.binding
        values.append(private.values)
        for topic, payload in update_messages(update):
            assert {m.witness(topic, payload) for m in members} == {"stored"}
            for action in machine.handle(MessageReceived(topic=topic, payload=payload, now_ms=2)):
                if isinstance(action, RequestDecryption):
                    requests.append(action.request)
    (request,) = requests
    done = []
    answers = exchange(members, request)  # all three commit; then any T = 2 shares
    for result in answers[1:]:
        done += machine.handle(KeyholderAnswered(result=result, now_ms=3))
    commits = [a for a in done if type(a).__name__ == "Commit"]
    record = next(r for c in commits for r in c.records if r.phase == "done")  # type: ignore[attr-defined]
    _, released = round_outcome(record.result)
    assert released is not None
    np.testing.assert_array_equal(released, np.sum(values, axis=0))
