"""A round over aggregator workers: the root's and the workers' machines, driven by direct calls.

Real Paillier keys, real device updates, real stores and in-process committee
members; a small in-memory bus routes what the machines publish (the root's
retained control message to the workers, the workers' partial sums to the root)
as the broker would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.keyholder import KeyHolder, exchange
from aggregator.optimizers import FedAvg
from aggregator.rounds import (
    Action,
    Alert,
    ControlReceived,
    KeyholderAnswered,
    MessageReceived,
    PartialReceived,
    Publish,
    Rejected,
    RelayUpdates,
    RequestDecryption,
    RoundConfig,
    RoundMachine,
    SendReceipt,
    Start,
    Tick,
    WitnessGapReported,
    round_outcome,
)
from aggregator.shards import RootMachine, WorkerMachine
from aggregator.store import AggregatorStore
from edge_sdk.crypto import PaillierPublicKey
from edge_sdk.identity import DeviceIdentity, sign_message
from edge_sdk.protocol import (
    Chunk,
    EncryptedUpdate,
    KeyholderRequest,
    PartialSum,
    Reassembler,
    RoundAnnouncement,
    ShardControl,
    Topics,
    parse_topic,
    shard_of,
    split_payload,
)
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import (
    FED,
    Fleet,
    deltas,
    make_keyholders,
    make_plan,
    make_update,
)

keypair = _support.keypair  # session fixture

DIM = 24
SHARDS = 2
TOPICS = Topics(FED)


class Node:
    """One machine with its own store."""

    def __init__(self, machine: RoundMachine, store: AggregatorStore) -> None:
        self.machine, self.store = machine, store
        self.actions: list[Action] = []


class Bus:
    """Routes the machines' publications as a broker would; runs the committee in-process."""

    def __init__(self, root: Node, workers: list[Node], members: list[KeyHolder]) -> None:
        self.root, self.workers, self.members = root, workers, members
        self.retained: dict[str, bytes] = {}
        self.partials = Reassembler(max_payload_size=1 << 24)
        self.drop_partials = False  # lose the workers' sealed sums (not their counts)
        self.now = 1_000

    def feed(self, node: Node, event: Any) -> list[Action]:
        actions = node.machine.handle(event)
        node.actions += actions
        out = list(actions)
        for action in actions:
            node.store.apply(action)
            if isinstance(action, Publish):
                out += self._route(action)
            if isinstance(action, RequestDecryption):
                for result in exchange(self.members, action.request):
                    out += self.feed(self.root, KeyholderAnswered(result=result, now_ms=self.now))
        return out

    def _route(self, action: Publish) -> list[Action]:
        if action.retain:
            self.retained[action.topic] = action.payload
        parsed = parse_topic(action.topic)
        assert parsed is not None
        out: list[Action] = []
        if parsed.kind == "aggregator/control":
            control = ShardControl.from_bytes(action.payload)
            for w in self.workers:
                out += self.feed(w, ControlReceived(control=control, now_ms=self.now))
        elif parsed.kind == "aggregator/partial":
            whole = self.partials.add(Chunk.from_bytes(action.payload))
            if whole is not None:
                partial = PartialSum.from_bytes(whole)
                if not (partial.sealed and self.drop_partials):
                    out += self.feed(self.root, PartialReceived(partial=partial, now_ms=self.now))
        return out

    def start(self) -> None:
        self.feed(self.root, Start(now_ms=self.now))
        for w in self.workers:
            self.feed(w, Start(now_ms=self.now))

    def send(self, update: EncryptedUpdate, *, shard: int | None = None) -> list[Action]:
        """The update on its shard's topic (or ``shard``'s), to that shard's worker."""
        k = shard_of(update.device_id, SHARDS) if shard is None else shard
        topic = f"{TOPICS.base}/updates/{k}/{update.device_id}"
        out: list[Action] = []
        for chunk in split_payload(
            update.to_bytes(),
            federation=FED,
            stream="update",
            sender=update.device_id,
            round_id=update.round_id,
        ):
            payload = chunk.to_bytes()
            for member in self.members:
                member.witness(topic, payload)
            out += self.feed(
                self.workers[k], MessageReceived(topic=topic, payload=payload, now_ms=self.now)
            )
        return out

    def tick(self, now: int) -> list[Action]:
        self.now = now
        out = self.feed(self.root, Tick(now_ms=now))
        for w in self.workers:
            out += self.feed(w, Tick(now_ms=now))
        return out


def _config(target: int, min_clients: int = 3, duration_ms: int = 60_000) -> RoundConfig:
    return RoundConfig(
        federation=FED,
        min_clients=min_clients,
        target_clients=target,
        round_duration_ms=duration_ms,
    )


def _common(pk: PaillierPublicKey, fleet: Fleet, identity: DeviceIdentity) -> dict[str, Any]:
    return {
        "initial_weights": np.zeros(DIM, dtype=np.float32),
        "committee": _support._default_committee().verifier(),
        "identity": identity,
    }


def _store(path: Path, pk: PaillierPublicKey) -> AggregatorStore:
    return AggregatorStore(path, federation=FED, key_fingerprint=pk.fingerprint)


def _worker(
    pk: PaillierPublicKey, fleet: Fleet, ident: DeviceIdentity, tmp: Path, k: int, target: int
) -> Node:
    plan = make_plan(pk, dim=DIM, min_clients=3)
    machine = WorkerMachine(
        _config(target), plan, fleet.registry, FedAvg(), shard=k, shards=SHARDS,
        **_common(pk, fleet, ident),
    )  # fmt: skip
    return Node(machine, _store(tmp / f"agg.worker-{k}.db", pk))


def _root(
    pk: PaillierPublicKey, fleet: Fleet, ident: DeviceIdentity, tmp: Path, target: int, **kw: Any
) -> Node:
    plan = make_plan(pk, dim=DIM, min_clients=3)
    machine = RootMachine(
        _config(target, **kw), plan, fleet.registry, FedAvg(), shards=SHARDS,
        **_common(pk, fleet, ident),
    )  # fmt: skip
    return Node(machine, _store(tmp / "agg.db", pk))


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(8, tmp_path / "registry.json")


@pytest.fixture
def ident() -> DeviceIdentity:
    return DeviceIdentity.generate("aggregator")


def _bus(keypair: Any, fleet: Fleet, ident: DeviceIdentity, tmp: Path, target: int = 6) -> Bus:
    pk, _ = keypair
    root = _root(pk, fleet, ident, tmp, target)
    workers = [_worker(pk, fleet, ident, tmp, k, target) for k in range(SHARDS)]
    members = make_keyholders(_support._default_committee(), fleet, min_clients=3)
    bus = Bus(root, workers, members)
    bus.start()
    return bus


def _announcement(bus: Bus) -> RoundAnnouncement:
    ann = bus.root.machine.announcement
    assert ann is not None
    return ann


def _statuses(actions: list[Action]) -> list[str]:
    return [a.receipt.status for a in actions if isinstance(a, SendReceipt)]


def _reasons(actions: list[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Rejected)]


def test_a_round_over_two_workers_releases_the_exact_sum(keypair, fleet, ident, tmp_path) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path, target=6)
    ann = _announcement(bus)
    assert ann.shards == SHARDS
    for w in bus.workers:
        assert w.machine.round_id == 1 and w.machine.phase == "collecting"
    shards = {d: shard_of(d, SHARDS) for d in fleet.ids()}
    assert set(shards.values()) == {0, 1}  # the fleet spans both workers
    values = {}
    for i, dev in enumerate(fleet.ids()[:6]):
        upd, vals = make_update(ann, pk, fleet.identities[dev], deltas(6, DIM)[i])
        values[dev] = vals
        assert _statuses(bus.send(upd)) == ["accepted"]
        bus.tick(bus.now + 300)  # workers report their counts
    # six reported: the root sealed, the workers sent their sums, the committee decrypted
    root = bus.root.machine
    model = root.model
    assert model is not None and model.version == 1 and root.round_id == 2
    rec = bus.root.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 6
    released = round_outcome(rec.result)[1]
    assert released is not None
    np.testing.assert_array_equal(released, np.sum(list(values.values()), axis=0))
    request = KeyholderRequest.from_bytes(rec.request)
    assert sorted(p.device_id for p in request.proofs()) == sorted(values)
    # each worker kept its own shard's rows only, and is on round 2 now
    for k, w in enumerate(bus.workers):
        rows = {d for d, _, _ in w.store.accepted(1)}
        assert rows == {d for d in values if shards[d] == k}
        assert w.machine.round_id == 2 and w.machine.phase == "collecting"
    # the new round's update is taken by the right worker again
    upd, _ = make_update(_announcement(bus), pk, fleet.identities["dev06"], deltas(1, DIM)[0])
    assert _statuses(bus.send(upd)) == ["accepted"]


def test_a_device_on_another_shards_topic_is_refused(keypair, fleet, ident, tmp_path) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path)
    dev = fleet.ids()[0]
    upd, _ = make_update(_announcement(bus), pk, fleet.identities[dev], deltas(1, DIM)[0])
    other = 1 - shard_of(dev, SHARDS)
    assert _reasons(bus.send(upd, shard=other)) == ["wrong_shard"]
    assert bus.workers[other].machine.count == 0
    assert _statuses(bus.send(upd)) == ["accepted"]  # its own shard takes it
    # and the unsharded topic is not a way in either
    topic = TOPICS.updates(dev)
    chunk = split_payload(upd.to_bytes(), federation=FED, stream="update", sender=dev, round_id=1)
    got = bus.feed(
        bus.workers[0], MessageReceived(topic=topic, payload=chunk[0].to_bytes(), now_ms=2_000)
    )
    assert _reasons(got) == ["wrong_shard"]


def _sealed_partial(bus: Bus, k: int) -> PartialSum:
    """Worker k's sealed partial sum as it last published it."""
    for action in reversed(bus.workers[k].actions):
        if isinstance(action, Publish) and "/aggregator/partial/" in action.topic:
            partial = PartialSum.from_bytes(Chunk.from_bytes(action.payload).data)
            if partial.sealed:
                return partial
    raise AssertionError("no sealed partial")


def _seal_with_dropped_partials(bus: Bus, fleet: Fleet, pk: PaillierPublicKey) -> None:
    ann = _announcement(bus)
    for i, dev in enumerate(fleet.ids()[:6]):
        upd, _ = make_update(ann, pk, fleet.identities[dev], deltas(6, DIM)[i])
        bus.send(upd)
    bus.drop_partials = True  # the root never hears the sealed sums
    bus.tick(bus.now + 300)
    assert bus.root.machine.phase == "sealing"
    assert all(w.machine.phase == "sealed" for w in bus.workers)
    bus.drop_partials = False


def test_the_root_refuses_forged_or_overlapping_partial_sums(
    keypair, fleet, ident, tmp_path
) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path)
    _seal_with_dropped_partials(bus, fleet, pk)
    root = bus.root
    genuine = [_sealed_partial(bus, k) for k in range(SHARDS)]
    # a worker's sum claiming the other shard's devices (as if one device were in both)
    stolen = dataclasses.replace(genuine[0], contributors=genuine[1].contributors, signature=b"")
    stolen = sign_message(dataclasses.replace(stolen, count=genuine[1].count), ident)
    got = bus.feed(root, PartialReceived(partial=stolen, now_ms=bus.now))
    assert _reasons(got) == ["bad_partial"] and "not in shard 0" in got[0].detail  # type: ignore[union-attr]
    # a device twice
    proofs = genuine[0].proofs()
    twice = KeyholderRequest.pack_proofs((*proofs, proofs[0]))
    bad = sign_message(
        dataclasses.replace(genuine[0], contributors=twice, count=len(proofs) + 1), ident
    )
    got = bus.feed(root, PartialReceived(partial=bad, now_ms=bus.now))
    assert _reasons(got) == ["bad_partial"]
    # a partial not signed by the aggregator's identity (the broker forging one)
    other = DeviceIdentity.generate("aggregator")
    forged = sign_message(dataclasses.replace(genuine[0], signature=b""), other)
    got = bus.feed(root, PartialReceived(partial=forged, now_ms=bus.now))
    assert _reasons(got) == ["bad_partial"] and any(isinstance(a, Alert) for a in got)
    assert root.machine.phase == "sealing"
    # the workers re-send their genuine sealed sums: the round completes
    bus.tick(bus.now + 3_500)
    assert root.machine.round_id == 2
    rec = root.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 6


def test_a_restarted_root_waits_for_the_sealed_sums_again(keypair, fleet, ident, tmp_path) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path)
    _seal_with_dropped_partials(bus, fleet, pk)
    bus.root.store.close()
    root = _root(pk, fleet, ident, tmp_path, 6)
    snapshot = root.store.load_snapshot()
    assert snapshot is not None and snapshot.current.phase == "sealing"
    root.machine.restore(snapshot)
    bus.root = root
    bus.feed(root, Start(now_ms=bus.now))  # re-publishes the sealed control: workers re-send
    assert root.machine.round_id == 2 and root.machine.model is not None
    rec = root.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 6


def test_a_restarted_worker_keeps_its_partial_sum(keypair, fleet, ident, tmp_path) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path, target=6)
    ann = _announcement(bus)
    sent: list[EncryptedUpdate] = []
    for i, dev in enumerate(fleet.ids()[:3]):
        upd, _ = make_update(ann, pk, fleet.identities[dev], deltas(6, DIM)[i])
        bus.send(upd)
        sent.append(upd)
    k = shard_of(sent[0].device_id, SHARDS)
    before = bus.workers[k].machine.count
    bus.workers[k].store.close()
    fresh = _worker(pk, fleet, ident, tmp_path, k, 6)
    snapshot = fresh.store.load_snapshot()
    assert snapshot is not None
    fresh.machine.restore(snapshot)
    bus.workers[k] = fresh
    bus.feed(fresh, Start(now_ms=bus.now))
    assert fresh.machine.count == before and fresh.machine.round_id == 1
    assert _statuses(bus.send(sent[0])) == ["duplicate"]  # redelivered: counted once
    for i, dev in enumerate(fleet.ids()[3:6], start=3):
        upd, _ = make_update(ann, pk, fleet.identities[dev], deltas(6, DIM)[i])
        bus.send(upd)
        bus.tick(bus.now + 300)
    rec = bus.root.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 6


def test_updates_after_the_seal_are_late_and_the_deadline_seals(
    keypair, fleet, ident, tmp_path
) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path, target=8)
    ann = _announcement(bus)
    ups = [
        make_update(ann, pk, fleet.identities[d], deltas(8, DIM)[i])[0]
        for i, d in enumerate(fleet.ids())
    ]
    for upd in ups[:4]:
        assert _statuses(bus.send(upd)) == ["accepted"]
    bus.drop_partials = True
    bus.tick(ann.deadline_ms)  # below target, past the deadline: sealed with what is in
    assert bus.root.machine.phase == "sealing"
    assert _statuses(bus.send(ups[5])) == ["late"]
    bus.drop_partials = False
    bus.tick(ann.deadline_ms + 3_500)
    rec = bus.root.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 4


def test_below_quorum_at_the_deadline_the_round_fails_and_the_next_opens(
    keypair, fleet, ident, tmp_path
) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path, target=8)
    ann = _announcement(bus)
    upd, _ = make_update(ann, pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    bus.send(upd)
    bus.tick(ann.deadline_ms)
    rec = bus.root.store.round_record(1)
    assert rec is not None and rec.phase == "failed" and rec.outcome == "quorum"
    assert all(w.machine.round_id == 2 for w in bus.workers)


def test_a_worker_refuses_a_control_message_it_cannot_trust(
    keypair, fleet, ident, tmp_path
) -> None:
    bus = _bus(keypair, fleet, ident, tmp_path)
    w = bus.workers[0]
    genuine = ShardControl.from_bytes(bus.retained[TOPICS.shard_control])
    forged = sign_message(
        dataclasses.replace(genuine, sealed=1, signature=b""), DeviceIdentity.generate("x")
    )
    got = bus.feed(w, ControlReceived(control=forged, now_ms=bus.now))
    assert _reasons(got) == ["bad_control"] and w.machine.phase == "collecting"
    unsigned = dataclasses.replace(genuine, round_id=5, signature=b"")
    got = bus.feed(w, ControlReceived(control=unsigned, now_ms=bus.now))
    assert _reasons(got) == ["bad_control"] and w.machine.round_id == 1


def test_a_single_aggregator_refuses_sharded_topics(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    machine = _support.make_machine(pk, fleet, dim=DIM)
    machine.handle(Start(now_ms=1_000))
    ann = machine.announcement
    assert ann is not None and ann.shards == 1
    # an unsharded round encodes (and is signed) as before the field existed
    assert "shards" not in ann.body()
    sharded = dataclasses.replace(ann, shards=3)
    assert sharded.body()["shards"] == 3
    assert RoundAnnouncement.from_bytes(sharded.to_bytes()).shards == 3
    assert sharded.signed_bytes() != ann.signed_bytes()
    upd, _ = make_update(ann, pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    chunk = split_payload(
        upd.to_bytes(), federation=FED, stream="update", sender="dev00", round_id=1
    )
    topic = f"{TOPICS.base}/updates/{shard_of('dev00', 2)}/dev00"
    got = machine.handle(MessageReceived(topic=topic, payload=chunk[0].to_bytes(), now_ms=2_000))
    assert _reasons(got) == ["wrong_shard"]


def test_an_update_ahead_of_the_worker_gets_no_receipt(keypair, fleet, ident, tmp_path) -> None:
    """The root's announcement can reach a device before its control reaches a worker."""
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path)
    ahead = dataclasses.replace(_announcement(bus), round_id=2)
    dev = fleet.ids()[0]
    upd, _ = make_update(ahead, pk, fleet.identities[dev], deltas(1, DIM)[0])
    got = bus.send(upd)
    assert _reasons(got) == ["ahead"] and _statuses(got) == []  # the device resends later
    # before any round at all, likewise
    fresh = _worker(pk, fleet, ident, tmp_path / "fresh", 0, 6)
    assert fresh.machine.handle(Start(now_ms=1)) == []  # nothing to report yet
    topic = TOPICS.round_updates("dev00", SHARDS)
    msg = MessageReceived(topic=topic, payload=b"x", now_ms=2)
    assert _reasons(fresh.machine.handle(msg)) == ["no_round"]


def test_a_sealed_worker_relays_its_own_shards_updates_to_a_member_that_missed_them(
    keypair, fleet, ident, tmp_path
) -> None:
    pk, _ = keypair
    bus = _bus(keypair, fleet, ident, tmp_path)
    _seal_with_dropped_partials(bus, fleet, pk)
    partials = [_sealed_partial(bus, k) for k in range(SHARDS)]
    proofs = tuple(p for part in partials for p in part.proofs())
    request = KeyholderRequest(
        federation=FED,
        round_id=1,
        request_id="r1-n6",
        packing=_announcement(bus).packing,
        packing_digest=_announcement(bus).packing_digest,
        privacy=_announcement(bus).privacy,
        contributors=KeyholderRequest.pack_proofs(proofs),
        encrypted_sum=partials[0].encrypted_sum,
        issued_ms=bus.now,
    )
    late = make_keyholders(_support._default_committee(), fleet, min_clients=3)[2]
    gap = late.gap_notice(request)  # it witnessed nothing
    assert gap is not None and len(gap.devices) == 6
    for k, w in enumerate(bus.workers):
        got = w.machine.handle(WitnessGapReported(gap=gap, now_ms=bus.now))
        relays = [a for a in got if isinstance(a, RelayUpdates)]
        assert len(relays) == 1
        assert set(relays[0].device_ids) == {p.device_id for p in partials[k].proofs()}
    # an unsigned notice is refused
    unsigned = dataclasses.replace(gap, signature=b"")
    got = bus.workers[0].machine.handle(WitnessGapReported(gap=unsigned, now_ms=bus.now))
    assert _reasons(got) == ["witness_gap_invalid_signature"]
