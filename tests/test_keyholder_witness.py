"""A committee member's witness (over a transport): it answers only sums it can rebuild.

A dishonest aggregator lists min_clients genuine, signed proofs but submits
ONE device's ciphertext as the "sum": without the witness the key holder
would decrypt a single update. With it, the sum must equal the product of
the blobs the key holder saw on updates/+ for exactly those proofs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aggregator.committee import request_digest
from aggregator.keyholder_service import KeyholderService
from aggregator.planning import build_announcement
from aggregator.witness_log import read_witness_log
from edge_sdk.crypto import CiphertextVector, PaillierPrivateKey, PaillierPublicKey, sum_ciphertexts
from edge_sdk.protocol import (
    Chunk,
    GlobalModel,
    KeyholderCommit,
    KeyholderRequest,
    KeyholderResult,
    Reassembler,
    Topics,
    model_digest,
    split_payload,
)
from edge_sdk.transport import InboundMessage, MemoryBroker
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import (
    FED,
    Fleet,
    deltas,
    make_keyholders,
    make_plan,
    make_update,
    update_messages,
)

keypair = _support.keypair
T = Topics(FED)
ZERO = b"\0" * 32
DIM = 40


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _setup(keys: tuple[PaillierPublicKey, PaillierPrivateKey], tmp_path: Path):  # type: ignore[no-untyped-def]
    pk, _ = keys
    fleet = Fleet.create(4, tmp_path / "registry.json")
    broker = MemoryBroker()
    clock = Clock()
    service = KeyholderService(
        make_keyholders(_support._default_committee(), fleet)[0],
        broker.transport("keyholder-1"),
        witness_grace_s=30.0,
        clock=clock,
    )
    service.start()
    aggregator = broker.transport("aggregator")
    aggregator.connect()
    results: list[KeyholderResult] = []
    asm = Reassembler()

    def on_result(msg: InboundMessage) -> None:
        whole = asm.add(Chunk.from_bytes(msg.payload))
        if whole is not None:
            results.append(KeyholderResult.from_bytes(whole))

    aggregator.subscribe(T.keyholder_result_filter, on_result)
    plan = make_plan(pk, dim=DIM, min_clients=3)
    weights = np.zeros(DIM, dtype="<f4").tobytes()
    model = GlobalModel(
        federation=FED,
        version=0,
        round_id=0,
        parent_digest=ZERO,
        digest=model_digest(0, ZERO, weights),
        num_params=DIM,
        weights=weights,
        created_ms=0,
    )
    ann = build_announcement(
        plan, federation=FED, round_id=1, model=model, issued_ms=0, deadline_ms=10**9
    )
    return fleet, broker, service, aggregator, results, clock, ann


def _ask(aggregator, request: KeyholderRequest) -> None:  # type: ignore[no-untyped-def]
    for piece in split_payload(
        request.to_bytes(),
        federation=FED,
        stream="update",
        sender="aggregator",
        round_id=request.round_id,
        max_message_size=64 * 1024,
    ):
        aggregator.publish(T.keyholder_request, piece.to_bytes())


def _request(ann, updates, encrypted_sum: bytes, request_id: str = "r1") -> KeyholderRequest:  # type: ignore[no-untyped-def]
    return KeyholderRequest(
        federation=FED,
        round_id=ann.round_id,
        request_id=request_id,
        packing=ann.packing,
        packing_digest=ann.packing_digest,
        contributors=KeyholderRequest.pack_proofs(tuple(u.proof() for u in updates)),
        encrypted_sum=encrypted_sum,
        issued_ms=1,
    )


def _publish_updates(broker: MemoryBroker, updates) -> None:  # type: ignore[no-untyped-def]
    for update in updates:
        device = broker.transport(f"pub-{update.device_id}")
        device.connect()
        for topic, payload in update_messages(update):
            device.publish(topic, payload)


def _vectors(pk: PaillierPublicKey, updates) -> list[CiphertextVector]:  # type: ignore[no-untyped-def]
    return [CiphertextVector.from_bytes(u.ciphertexts, pk, u.num_ciphertexts) for u in updates]


def _co_commit(broker: MemoryBroker, fleet: Fleet, updates, request: KeyholderRequest) -> None:  # type: ignore[no-untyped-def]
    """The other two members (in memory) witness the updates and publish their commitments."""
    others = make_keyholders(_support._default_committee(), fleet)[1:]
    for member in others:
        for update in updates:
            for topic, payload in update_messages(update):
                member.witness(topic, payload)
        commit = member.handle(request)
        assert isinstance(commit, KeyholderCommit), commit
        transport = broker.transport(f"{member.holder_id}-co")
        transport.connect()
        transport.publish(T.keyholder_commit(member.holder_id), commit.to_bytes())


def test_honest_sum_is_decrypted(keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pk, _ = keypair
    fleet, broker, _svc, aggregator, results, _clock, ann = _setup(keypair, tmp_path)
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    _publish_updates(broker, updates)
    request = _request(ann, updates, sum_ciphertexts(pk, _vectors(pk, updates)).to_bytes())
    _ask(aggregator, request)
    assert results == []  # committed; the share waits for the commit quorum (3 of 3)
    _co_commit(broker, fleet, updates, request)
    assert [r.status for r in results] == ["ok"] and results[0].count == 3


def test_one_devices_ciphertext_passed_off_as_the_sum_is_refused(keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pk, _ = keypair
    fleet, broker, svc, aggregator, results, _clock, ann = _setup(keypair, tmp_path)
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    _publish_updates(broker, updates)
    _ask(aggregator, _request(ann, updates, updates[0].ciphertexts))  # the attack
    assert [(r.status, r.reason) for r in results] == [("refused", "verify_sum_mismatch")]
    assert results[0].share == b""
    assert svc.keyholder.answered_rounds() == {}  # nothing was decrypted


def test_unseen_contribution_waits_then_is_refused(keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pk, _ = keypair
    fleet, broker, svc, aggregator, results, clock, ann = _setup(keypair, tmp_path)
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    _publish_updates(broker, updates[:2])  # the key holder never sees the third
    request = _request(ann, updates, sum_ciphertexts(pk, _vectors(pk, updates)).to_bytes())
    _ask(aggregator, request)
    assert results == [] and svc.deferred == 1  # within the grace period: wait for a re-ask
    clock.now = 31.0
    _ask(aggregator, request)
    assert [(r.status, r.reason) for r in results] == [("refused", "verify_ciphertext_missing")]


def test_late_witnessed_blob_lets_the_re_ask_succeed(keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pk, _ = keypair
    fleet, broker, _svc, aggregator, results, clock, ann = _setup(keypair, tmp_path)
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    _publish_updates(broker, updates[:2])
    request = _request(ann, updates, sum_ciphertexts(pk, _vectors(pk, updates)).to_bytes())
    _ask(aggregator, request)
    _publish_updates(broker, updates[2:])
    clock.now = 5.0
    _ask(aggregator, request)
    _co_commit(broker, fleet, updates, request)
    assert [r.status for r in results] == ["ok"]


def test_restarted_member_reloads_what_it_witnessed(keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A member killed mid-round (state on disk only) loses none of the updates it saw."""
    pk, _ = keypair
    fleet = Fleet.create(4, tmp_path / "registry.json")
    committee = _support._default_committee()
    broker = MemoryBroker()
    state = tmp_path / "kh1" / "state.json"
    state.parent.mkdir()
    member = make_keyholders(committee, fleet)[0]
    first = KeyholderService(member, broker.transport("keyholder-1"), state_path=state)
    first.start()
    plan = make_plan(pk, dim=DIM, min_clients=3)
    weights = np.zeros(DIM, dtype="<f4").tobytes()
    model = GlobalModel(
        federation=FED,
        version=0,
        round_id=0,
        parent_digest=ZERO,
        digest=model_digest(0, ZERO, weights),
        num_params=DIM,
        weights=weights,
        created_ms=0,
    )
    ann = build_announcement(
        plan, federation=FED, round_id=1, model=model, issued_ms=0, deadline_ms=10**9
    )
    updates = [
        make_update(ann, pk, fleet.identities[d], x)[0]
        for d, x in zip(fleet.ids()[:3], deltas(3, DIM), strict=True)
    ]
    _publish_updates(broker, updates)
    log_path = tmp_path / "kh1" / "state-witness.log"
    first.flush_witness()  # what the flusher does within witness_sync_ms
    stored = [(d, r) for d, r, _ in read_witness_log(log_path)]
    assert stored == [(u.device_id, 1) for u in updates]
    assert first.witness_syncs == 1  # one fsync for the three updates
    first.transport.close()  # "SIGKILL": nothing but the files survives
    restarted = make_keyholders(committee, fleet)[0]
    assert restarted.missing(_request(ann, updates, b"\x01")) == 3
    second = KeyholderService(restarted, broker.transport("keyholder-1b"), state_path=state)
    assert second.reloaded == 3
    request = _request(ann, updates, sum_ciphertexts(pk, _vectors(pk, updates)).to_bytes())
    assert restarted.missing(request) == 0
    result = restarted.handle(request)
    assert isinstance(result, KeyholderCommit)  # it commits again to this request
    assert result.request_digest == request_digest(request)
    # the aggregator re-asks: the same request is not checked again (no re-verification)
    again = restarted.handle(request)
    assert isinstance(again, KeyholderCommit) and again.request_digest == result.request_digest
    assert restarted.counters.get("reask") == 1
    second._prune()
    assert read_witness_log(log_path) == []  # answered: the copies are gone
