"""Attacks of issue 13 that now fail, each with the honest round still closing.

Real 2048-bit committee key (2-of-3, safe primes), a committee-signed
federation policy with a DJN base, real signed and bound device updates,
the real round machine and real committee members (sans-io: the bytes a
broker would deliver are fed to each party directly).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import gmpy2
import msgpack
import numpy as np
import pytest

from aggregator.keyholder import KeyHolder, exchange
from aggregator.keyholder_config import PolicyTerms
from aggregator.optimizers import FedAvg
from aggregator.planning import build_announcement, plan_rounds
from aggregator.rounds import (
    Action,
    KeyholderAnswered,
    MessageReceived,
    Rejected,
    RequestDecryption,
    RoundConfig,
    RoundMachine,
    Start,
    round_outcome,
)
from aggregator.service import AlertLimiter
from edge_sdk.crypto import CiphertextVector
from edge_sdk.errors import RemoteProtocolError
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, build_update
from edge_sdk.privacy import DPPolicy
from edge_sdk.protocol import EncryptedUpdate, KeyholderRequest, digest
from edge_sdk.randomness import DeterministicRandom
from firmware_sim.committee import InMemoryCommittee
from tests.test_aggregator_support import SAFE_PRIMES, update_messages

FED = "attackfed"
DIM = 24
QUORUM = 3
TERMS = PolicyTerms(
    mode="distributed", min_clients=QUORUM, epsilon=8.0, delta=1e-5, rounds=10, max_clip=1.0
)


@pytest.fixture(scope="module")
def committee() -> InMemoryCommittee:
    return InMemoryCommittee(FED, primes=SAFE_PRIMES)


class World:
    """Aggregator machine, committee members and enrolled, approved devices."""

    def __init__(
        self, committee: InMemoryCommittee, tmp: Path, devices: int = 6, *, start: bool = True
    ) -> None:
        self.committee = committee
        self.pk = committee.public_key
        self.policy = committee.policy(TERMS)
        self.registry = DeviceRegistry(tmp / "registry.json", FED)
        self.devices = {f"dev{i}": DeviceIdentity.generate(f"dev{i}") for i in range(devices)}
        for ident in self.devices.values():
            self.registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
        committee.approve_all(self.registry)
        manifest = committee.manifest
        self.registry.require_approvals(
            {h.holder_id: h.public_key for h in manifest.holders}, manifest.threshold
        )
        self.plan = plan_rounds(
            self.pk,
            dimension=DIM,
            max_contributors=16,
            min_clients=QUORUM,
            clip=1.0,
            policy=DPPolicy(
                mode="distributed", epsilon=8.0, delta=1e-5, rounds=10, clip=1.0, min_clients=3
            ),
        )
        self.machine = RoundMachine(
            RoundConfig(
                federation=FED,
                min_clients=QUORUM,
                target_clients=4,
                round_duration_ms=60_000,
            ),
            self.plan,
            self.registry,
            FedAvg(),
            initial_weights=np.zeros(DIM, np.float32),
            committee=committee.verifier(),
            binding=self.policy.djn_base,
        )
        self.members = committee.members(self.registry, min_clients=1, policy=self.policy)
        self.actions: list[Action] = []
        if start:
            self.feed(Start(now_ms=1_000))

    @property
    def announcement(self) -> Any:
        ann = self.machine.announcement
        assert ann is not None
        return ann

    def feed(self, event: Any) -> list[Action]:
        out = self.machine.handle(event)
        self.actions += out
        for action in list(out):
            if isinstance(action, RequestDecryption):
                for result in exchange(self.members, action.request):
                    out += self.feed(KeyholderAnswered(result=result, now_ms=5_000))
        return out

    def update(self, name: str, seed: int = 0, ann: Any = None) -> EncryptedUpdate:
        ctx = RoundContext.from_announcement(ann or self.announcement, self.pk, policy=self.policy)
        rng = DeterministicRandom(seed.to_bytes(8, "big") + name.encode())
        delta = np.random.default_rng(seed + len(name)).normal(0, 0.02, DIM)
        update, _ = build_update(
            delta, ctx, self.devices[name], rng=rng, allow_insecure_rng=True, now_ms=2_000
        )
        return update

    def send(self, update: EncryptedUpdate, topic_device: str | None = None) -> list[Any]:
        """Deliver an update to every member's witness and to the aggregator."""
        witnessed = []
        out: list[Action] = []
        for topic, payload in update_messages(update, topic_device=topic_device):
            witnessed.append([m.witness(topic, payload) for m in self.members])
            out += self.feed(MessageReceived(topic=topic, payload=payload, now_ms=2_000))
        return [out, witnessed[-1]]


def _forge(update: EncryptedUpdate, signer: DeviceIdentity, **changes: Any) -> EncryptedUpdate:
    fields = {f: getattr(update, f) for f in update.RULES}
    fields.update(changes)
    if "ciphertexts" in changes:
        fields["ciphertext_digest"] = digest(changes["ciphertexts"])
    fields["device_id"] = signer.device_id
    unsigned = EncryptedUpdate(**fields)
    fields["signature"] = signer.sign(unsigned.signing_bytes())
    return EncryptedUpdate(**fields)


def _reasons(actions: list[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Rejected)]


def _honest_round_closes(world: World, names: list[str]) -> None:
    for name in names:
        world.send(world.update(name))
    rec = [a for a in world.actions if isinstance(a, RequestDecryption)]
    assert rec, "the honest round never closed"
    model = world.machine.model
    assert model is not None and model.version == 1


def test_honest_updates_carry_a_binding_proof_and_the_round_closes(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    world = World(committee, tmp_path)
    update = world.update("dev0")
    assert len(update.binding) > 0
    _honest_round_closes(world, ["dev0", "dev1", "dev2", "dev3"])


def test_inflated_quorum_announcement_is_refused_by_the_device(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    world = World(committee, tmp_path)
    inflated = plan_rounds(
        world.pk,
        dimension=DIM,
        max_contributors=10**6,
        min_clients=10**6,
        clip=1.0,
        policy=DPPolicy(
            mode="distributed", epsilon=8.0, delta=1e-5, rounds=10, clip=1.0, min_clients=10**6
        ),
    )
    model = world.machine.model
    assert model is not None
    ann = build_announcement(
        inflated, federation=FED, round_id=1, model=model, issued_ms=1, deadline_ms=10**9
    )
    # without a pinned policy the device would accept it (the old hole) ...
    ctx = RoundContext.from_announcement(ann, world.pk)
    assert ctx.noise is not None and ctx.noise.min_clients == 10**6
    # ... with the committee's policy it refuses
    with pytest.raises(RemoteProtocolError) as info:
        RoundContext.from_announcement(ann, world.pk, policy=world.policy)
    assert info.value.reason == "outside_policy"
    # and every member refuses a sum whose noise spec is the inflated one
    request = KeyholderRequest(
        federation=FED,
        round_id=1,
        request_id="r1",
        packing=inflated.packing.to_bytes(),
        packing_digest=inflated.packing.digest(),
        privacy=inflated.privacy_field,
        contributors=b"",
        encrypted_sum=b"\x01" * world.pk.ciphertext_bytes,
        issued_ms=1,
    )
    assert {m.handle(request).reason for m in world.members} == {"outside_policy"}
    # the honest round still closes
    _honest_round_closes(world, ["dev0", "dev1", "dev2", "dev3"])


def test_members_refuse_sums_below_the_policy_quorum(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    world = World(committee, tmp_path)  # members' own min_clients is 1: the policy rules
    ups = [world.update(n) for n in ("dev0", "dev1")]
    for u in ups:
        world.send(u)
    vectors = [CiphertextVector.from_bytes(u.ciphertexts, world.pk, u.num_ciphertexts) for u in ups]
    from edge_sdk.crypto import sum_ciphertexts

    request = KeyholderRequest(
        federation=FED,
        round_id=1,
        request_id="small",
        packing=world.plan.packing.to_bytes(),
        packing_digest=world.plan.packing.digest(),
        privacy=world.plan.privacy_field,
        contributors=KeyholderRequest.pack_proofs(tuple(u.proof() for u in ups)),
        encrypted_sum=sum_ciphertexts(world.pk, vectors).to_bytes(),
        issued_ms=1,
    )
    assert {m.handle(request).reason for m in world.members} == {"quorum"}


def test_cancellation_of_others_ciphertexts_is_refused(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    world = World(committee, tmp_path)
    nsq = gmpy2.mpz(world.pk.nsquare)
    honest = {n: world.update(n) for n in ("dev0", "dev1", "dev2")}
    for u in honest.values():
        world.send(u)
    # dev5 colludes with the aggregator: Enc(m) * c_dev0^-1 * c_dev1^-1, so the
    # "sum" of dev0, dev1, dev2 and dev5 would be dev2's update plus m
    own = world.update("dev5")
    mine = CiphertextVector.from_bytes(own.ciphertexts, world.pk, own.num_ciphertexts).values
    evil = []
    for j, c in enumerate(mine):
        x = gmpy2.mpz(c)
        for name in ("dev0", "dev1"):
            other = CiphertextVector.from_bytes(
                honest[name].ciphertexts, world.pk, own.num_ciphertexts
            ).values[j]
            x = x * gmpy2.invert(gmpy2.mpz(other), nsq) % nsq
        evil.append(int(x))
    blob = CiphertextVector(world.pk, evil).to_bytes()
    attack = _forge(own, world.devices["dev5"], ciphertexts=blob)  # keeps its own proof
    actions, witnessed = world.send(attack)
    assert "bad_binding" in _reasons(actions)
    assert set(witnessed) == {"bad_binding"}
    assert world.machine.count == 3 and "dev5" not in world.machine.contributors
    world.send(world.update("dev3"))
    model = world.machine.model
    assert model is not None and model.version == 1  # the honest round closed without it


def test_copied_and_rerandomized_ciphertexts_under_another_identity_are_refused(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    world = World(committee, tmp_path)
    victim = world.update("dev0")
    world.send(victim)
    thief = world.devices["dev4"]
    copy = _forge(victim, thief)  # same ciphertexts and proof, re-signed by dev4
    actions, witnessed = world.send(copy)
    assert "bad_binding" in _reasons(actions) and set(witnessed) == {"bad_binding"}
    # re-randomised: c * hs^a' (still an encryption of the victim's plaintexts)
    base = world.policy.djn_base
    assert base is not None
    nsq = world.pk.nsquare
    values = CiphertextVector.from_bytes(victim.ciphertexts, world.pk, victim.num_ciphertexts)
    rerand = [int(c) * pow(base.hs, 12345 + j, nsq) % nsq for j, c in enumerate(values)]
    blob = CiphertextVector(world.pk, rerand).to_bytes()
    actions, witnessed = world.send(_forge(victim, thief, ciphertexts=blob))
    assert "bad_binding" in _reasons(actions) and set(witnessed) == {"bad_binding"}
    # the victim's own update again is a plain duplicate; the round still closes
    for name in ("dev1", "dev2", "dev3"):
        world.send(world.update(name))
    model = world.machine.model
    assert model is not None and model.version == 1
    rec = world.machine.contributors if world.machine.phase == "collecting" else None
    assert rec is None or "dev4" not in rec


def test_device_enrolled_by_the_aggregator_alone_contributes_nothing(
    committee: InMemoryCommittee, tmp_path: Path
) -> None:
    world = World(committee, tmp_path)
    sybil = DeviceIdentity.generate("sybil")
    world.registry.enroll("sybil", sybil.public_key_bytes, now_ms=1)  # no approvals
    world.devices["sybil"] = sybil
    update = world.update("sybil")
    actions, witnessed = world.send(update)
    assert _reasons(actions) == ["not_approved"]
    assert set(witnessed) == {"unknown_device"}
    # one member's approval is not enough (T = 2)
    world.registry.approve("sybil", committee.identities[0])
    assert world.registry.approval_count("sybil") == 1
    assert not world.registry.is_active("sybil")
    # a request listing it is refused by every member
    honest = [world.update(n) for n in ("dev0", "dev1")]
    for u in honest:
        world.send(u)
    request = KeyholderRequest(
        federation=FED,
        round_id=1,
        request_id="sybil",
        packing=world.plan.packing.to_bytes(),
        packing_digest=world.plan.packing.digest(),
        privacy=world.plan.privacy_field,
        contributors=KeyholderRequest.pack_proofs(tuple(u.proof() for u in [*honest, update])),
        encrypted_sum=update.ciphertexts,
        issued_ms=1,
    )
    assert {m.handle(request).reason for m in world.members} == {"proof_not_approved"}
    for name in ("dev2", "dev3"):
        world.send(world.update(name))
    model = world.machine.model
    assert model is not None and model.version == 1
    outcome = [a for a in world.actions if isinstance(a, RequestDecryption)]
    assert outcome and all(p.device_id != "sybil" for p in outcome[-1].request.proofs())


def test_policy_needs_threshold_signatures(committee: InMemoryCommittee) -> None:
    policy = committee.policy(TERMS)
    policy.verify()
    one = dataclasses.replace(policy, signatures=policy.signatures[:1])
    with pytest.raises(Exception, match="needs 2"):
        one.verify()
    # a changed term invalidates every signature
    looser = dataclasses.replace(policy, min_clients=10**6)
    with pytest.raises(Exception, match="valid committee signatures"):
        looser.verify()
    with pytest.raises(ValueError):
        KeyHolder(
            committee.ceremony.shares[0],
            committee.manifest,
            DeviceRegistry(Path("/nonexistent/r.json"), FED),
            holder_id="keyholder-1",
            identity=committee.identities[0],
            min_clients=1,
            policy=looser,
        )


def test_alert_flood_from_one_device_is_bounded(
    committee: InMemoryCommittee, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = AlertLimiter(per_window=5, window_ms=60_000)
    verdicts = [limiter.admit("equivocation", "dev1", 1_000 + i) for i in range(1_000)]
    assert verdicts[:4] == ["log"] * 4 and verdicts[4] == "last"
    assert set(verdicts[5:]) == {"suppress"} and limiter.suppressed == 995
    assert limiter.admit("equivocation", "dev2", 2_000) == "log"  # others unaffected
    assert limiter.admit("equivocation", "dev1", 61_001) == "log"  # a new window


def _started_service(committee: InMemoryCommittee, tmp_path: Path) -> tuple[World, Any, Any]:
    """A world's round machine in a started AggregatorService on an in-memory broker."""
    from aggregator.service import AggregatorService
    from aggregator.store import AggregatorStore
    from edge_sdk.transport import MemoryBroker

    world = World(committee, tmp_path, start=False)
    broker = MemoryBroker()
    store = AggregatorStore(tmp_path / "agg.db", federation=FED)
    service = AggregatorService(
        world.machine, store, broker.transport("aggregator", manual_ack=True)
    )
    service.start()
    return world, broker, service


def test_equivocation_flood_through_the_service_logs_a_bounded_number(
    committee: InMemoryCommittee, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world, broker, service = _started_service(committee, tmp_path)
    device = broker.transport("dev1")
    device.connect()
    first = world.update("dev1")
    for topic, payload in update_messages(first):
        device.publish(topic, payload)
    service.pump()
    caplog.set_level(logging.ERROR, logger="edgefl.aggregator")
    for i in range(60):  # re-signed mutations of its own update
        mutated = _forge(first, world.devices["dev1"], created_ms=3_000 + i)
        for topic, payload in update_messages(mutated):
            device.publish(topic, payload)
        service.pump()
    lines = [r for r in caplog.records if "ALERT equivocation" in r.getMessage()]
    assert 1 <= len(lines) <= 5
    assert service.alerts.suppressed >= 55
    assert world.machine.rejections["equivocation"] == 60  # every event still counted
    service.close()


def test_service_checks_approvals_before_the_first_updates(
    committee: InMemoryCommittee, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The started service checks every device's approvals off the intake path, once."""
    import time

    import edge_sdk.identity as identity

    real = identity.verify_signature
    calls: list[bytes] = []

    def counting(key: bytes, data: bytes, signature: bytes) -> None:
        calls.append(data)
        real(key, data, signature)

    monkeypatch.setattr(identity, "verify_signature", counting)
    world, broker, service = _started_service(committee, tmp_path)
    devices = world.registry.active_ids()
    deadline = time.monotonic() + 30
    while len(calls) < 2 * len(devices) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(calls) == 2 * len(devices)  # T = 2 approvals of each device, nothing else
    device = broker.transport("dev1")
    device.connect()
    for topic, payload in update_messages(world.update("dev1")):
        device.publish(topic, payload)
    before = len(calls)
    service.pump()
    assert world.machine.count == 1
    assert len(calls) == before + 1  # only the update's own signature
    service.close()


def test_round_outcome_names_both_members(committee: InMemoryCommittee, tmp_path: Path) -> None:
    world = World(committee, tmp_path)
    _honest_round_closes(world, ["dev0", "dev1", "dev2", "dev3"])
    commits = [a for a in world.actions if type(a).__name__ == "Commit"]
    done = [r for c in commits for r in c.records if r.phase == "done"]  # type: ignore[attr-defined]
    results, released = round_outcome(done[-1].result)
    assert len(results) == 2 and released is not None and released.shape == (DIM,)
    assert msgpack.unpackb(done[-1].result)["v"] == 1
