"""Round state machine + store + in-process key holder, driven by direct calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.keyholder import KeyHolder, exchange
from aggregator.rounds import (
    Action,
    Alert,
    Commit,
    KeyholderAnswered,
    MessageReceived,
    PersistAccepted,
    Publish,
    Rejected,
    RequestDecryption,
    RoundMachine,
    SendReceipt,
    Start,
    Tick,
    round_outcome,
)
from aggregator.store import AggregatorStore
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey
from edge_sdk.protocol import Chunk, EncryptedUpdate, GlobalModel, RoundAnnouncement
from edge_sdk.protocol.messages import digest
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import (
    FED,
    Fleet,
    deltas,
    make_keyholders,
    make_machine,
    make_update,
    update_messages,
)

keypair = _support.keypair  # session fixture


DIM = 40


class Driver:
    """Executes machine actions against a store and in-process committee members."""

    def __init__(
        self, machine: RoundMachine, store: AggregatorStore, members: list[KeyHolder]
    ) -> None:
        self.machine, self.store, self.members = machine, store, members
        self.log: list[Action] = []
        self.published: dict[str, bytes] = {}

    def feed(self, event: Any) -> list[Action]:
        actions = self.machine.handle(event)
        out = list(actions)
        for action in actions:
            self.store.apply(action)
            if isinstance(action, Publish) and action.retain:
                self.published[action.topic] = action.payload
            if isinstance(action, RequestDecryption):
                for result in exchange(self.members, action.request):
                    out += self.feed(KeyholderAnswered(result=result, now_ms=event.now_ms))
        self.log += actions
        return out

    def send(self, update: EncryptedUpdate, now: int = 2_000, **kw: Any) -> list[Action]:
        out: list[Action] = []
        for topic, payload in update_messages(update, **kw):
            for member in self.members:  # each member witnesses what the broker delivers
                member.witness(topic, payload)
            out += self.feed(MessageReceived(topic=topic, payload=payload, now_ms=now))
        return out

    def announcement(self) -> RoundAnnouncement:
        ann = self.machine.announcement
        assert ann is not None
        return ann


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(6, tmp_path / "registry.json")


def _driver(
    keys: tuple[PaillierPublicKey, PaillierPrivateKey], fleet: Fleet, tmp_path: Path, **kw: Any
) -> Driver:
    pk, _ = keys
    committee = _support._default_committee()
    machine = make_machine(pk, fleet, dim=DIM, committee=committee, **kw)
    store = AggregatorStore(tmp_path / "agg.db", federation=FED, key_fingerprint=pk.fingerprint)
    members = make_keyholders(committee, fleet, min_clients=kw.get("min_clients", 3))
    return Driver(machine, store, members)


def _statuses(actions: list[Action]) -> list[str]:
    return [a.receipt.status for a in actions if isinstance(a, SendReceipt)]


def _reasons(actions: list[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Rejected)]


def _model(driver: Driver) -> GlobalModel:
    m = driver.machine.model
    assert m is not None
    return m


def test_full_round_model_is_mean_of_quantized_deltas(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=4)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    values = []
    for i, dev in enumerate(fleet.ids()[:4]):
        upd, vals = make_update(ann, pk, fleet.identities[dev], deltas(4, DIM)[i])
        values.append(vals)
        assert _statuses(d.send(upd)) == ["accepted"]
    model = _model(d)
    assert model.version == 1 and d.machine.round_id == 2
    expected = (np.sum(values, axis=0) / d.machine.plan.packing.scale / 4).astype(np.float32)
    np.testing.assert_array_equal(np.frombuffer(model.weights, "<f4"), expected)
    # the released aggregate is the exact integer sum
    rec = d.store.round_record(1)
    assert rec is not None and rec.phase == "done" and rec.count == 4
    results, released = round_outcome(rec.result)
    assert sorted(r.holder_id for r in results) == ["keyholder-1", "keyholder-2"]
    assert released is not None
    np.testing.assert_array_equal(released, np.sum(values, axis=0))
    # retained model and round were re-published
    assert d.published[d.machine.topics.round] == d.announcement().to_bytes()


def test_duplicate_is_acknowledged_and_counted_once(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=4)
    d.feed(Start(now_ms=1_000))
    upd, _ = make_update(d.announcement(), pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    assert _statuses(d.send(upd)) == ["accepted"]
    before = d.machine.encrypted_sum
    assert _statuses(d.send(upd)) == ["duplicate"]
    assert d.machine.count == 1 and d.machine.encrypted_sum == before
    assert len(d.store.accepted(1)) == 1


def test_equivocation_rejected_with_alert(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=4)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    first, _ = make_update(ann, pk, fleet.identities["dev00"], deltas(1, DIM)[0], seed=1)
    second, _ = make_update(ann, pk, fleet.identities["dev00"], deltas(1, DIM)[0], seed=2)
    d.send(first)
    before = d.machine.encrypted_sum
    actions = d.send(second)
    assert _statuses(actions) == ["rejected"]
    assert _reasons(actions) == ["equivocation"]
    assert any(isinstance(a, Alert) and a.kind == "equivocation" for a in actions)
    assert d.machine.count == 1 and d.machine.encrypted_sum == before


def test_replay_onto_other_device_topic_rejected(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=4)
    d.feed(Start(now_ms=1_000))
    upd, _ = make_update(d.announcement(), pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    actions = d.send(upd, topic_device="dev01")
    assert _reasons(actions) == ["topic_mismatch"] and d.machine.count == 0


def test_replay_from_other_round_is_late(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=3)
    d.feed(Start(now_ms=1_000))
    ann1 = d.announcement()
    for i, dev in enumerate(fleet.ids()[:3]):
        d.send(make_update(ann1, pk, fleet.identities[dev], deltas(3, DIM)[i])[0])
    assert d.machine.round_id == 2
    late, _ = make_update(ann1, pk, fleet.identities["dev04"], deltas(5, DIM)[4])
    actions = d.send(late)
    assert _statuses(actions) == ["late"] and d.machine.count == 0
    # a device re-sending its accepted update after the close gets "duplicate"
    again, _ = make_update(ann1, pk, fleet.identities["dev00"], deltas(3, DIM)[0])
    assert _statuses(d.send(again)) == ["duplicate"]


def test_future_round_rejected(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    fields = {f: getattr(ann, f) for f in ann.RULES}
    fields["round_id"] = 7
    upd, _ = make_update(
        RoundAnnouncement(**fields), pk, fleet.identities["dev00"], deltas(1, DIM)[0]
    )
    assert _reasons(d.send(upd)) == ["wrong_round"]


def _forge(update: EncryptedUpdate, **changes: Any) -> EncryptedUpdate:
    fields = {f: getattr(update, f) for f in update.RULES}
    fields.update(changes)
    return EncryptedUpdate(**fields)


def test_unknown_device_bitflip_and_revoked_rejected(keypair, fleet, tmp_path) -> None:
    from edge_sdk.identity import DeviceIdentity

    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    stranger = DeviceIdentity.generate("stranger")
    upd, _ = make_update(ann, pk, stranger, deltas(1, DIM)[0])
    assert _reasons(d.send(upd)) == ["unknown_device"]
    good, _ = make_update(ann, pk, fleet.identities["dev01"], deltas(1, DIM)[0])
    sig = bytearray(good.signature)
    sig[5] ^= 1
    assert _reasons(d.send(_forge(good, signature=bytes(sig)))) == ["bad_signature"]
    blob = bytearray(good.ciphertexts)
    blob[100] ^= 1
    flipped = _forge(good, ciphertexts=bytes(blob), ciphertext_digest=digest(bytes(blob)))
    assert _reasons(d.send(flipped)) == ["bad_signature"]
    fleet.registry.revoke("dev01", now_ms=2)
    assert _reasons(d.send(good)) == ["revoked"]
    assert d.machine.count == 0 and d.store.accepted(1) == []


def test_out_of_range_ciphertext_and_wrong_spec_rejected(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    ident = fleet.identities["dev02"]
    good, _ = make_update(ann, pk, ident, deltas(1, DIM)[0])
    width = pk.ciphertext_bytes
    bad_blob = pk.nsquare.to_bytes(width, "big") + good.ciphertexts[width:]

    # re-sign as the (malicious but enrolled) device would
    def signed(**changes: Any) -> EncryptedUpdate:
        unsigned = _forge(good, **changes)
        return _forge(unsigned, signature=ident.sign(unsigned.signing_bytes()))

    out_of_range = signed(ciphertexts=bad_blob, ciphertext_digest=digest(bad_blob))
    assert _reasons(d.send(out_of_range)) == ["ciphertext_range"]
    # device 3: wrong packing spec digest, wrong key fingerprint, wrong shape
    ident3 = fleet.identities["dev03"]
    base, _ = make_update(ann, pk, ident3, deltas(1, DIM)[0])

    def signed3(**changes: Any) -> EncryptedUpdate:
        unsigned = _forge(base, **changes)
        return _forge(unsigned, signature=ident3.sign(unsigned.signing_bytes()))

    assert _reasons(d.send(signed3(packing_digest=bytes(32)))) == ["wrong_spec"]
    # each of those was rejected, so the device may still send a valid update;
    # but a different one now is fine only once: use other devices for the rest
    ident4 = fleet.identities["dev04"]
    base4, _ = make_update(ann, pk, ident4, deltas(1, DIM)[0])
    unsigned = _forge(base4, key_fingerprint=bytes(32))
    assert _reasons(d.send(_forge(unsigned, signature=ident4.sign(unsigned.signing_bytes())))) == [
        "wrong_key"
    ]
    assert d.machine.count == 0


def test_chunk_reassembly_errors_rejected(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path)
    d.feed(Start(now_ms=1_000))
    upd, _ = make_update(d.announcement(), pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    topic = d.machine.topics.updates("dev00")
    actions = d.feed(MessageReceived(topic=topic, payload=b"\x93garbage", now_ms=1))
    assert _reasons(actions)[0].startswith("decode_")
    chunk = Chunk(
        federation=FED,
        stream="update",
        sender="dev00",
        round_id=1,
        payload_digest=digest(upd.to_bytes()),
        payload_size=len(upd.to_bytes()),
        index=0,
        total=1,
        data=upd.to_bytes()[:-1] + b"\x00",
    )
    assert _reasons(d.feed(MessageReceived(topic=topic, payload=chunk.to_bytes(), now_ms=1))) == [
        "chunk_chunk_digest"
    ]
    assert d.machine.count == 0


def test_quorum_not_reached_fails_round_and_next_starts(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, duration_ms=10_000)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    for i, dev in enumerate(fleet.ids()[:2]):
        d.send(make_update(ann, pk, fleet.identities[dev], deltas(2, DIM)[i])[0])
    assert d.feed(Tick(now_ms=5_000)) == []
    actions = d.feed(Tick(now_ms=11_000))
    assert any(isinstance(a, Commit) for a in actions)
    rec = d.store.round_record(1)
    assert rec is not None and rec.phase == "failed" and rec.outcome == "quorum"
    assert d.machine.round_id == 2 and d.machine.phase == "collecting" and d.machine.count == 0
    assert _model(d).version == 0
    assert d.announcement().deadline_ms == 11_000 + 10_000


def test_deadline_with_quorum_closes_round(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, duration_ms=10_000, target=6)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    for i, dev in enumerate(fleet.ids()[:3]):
        d.send(make_update(ann, pk, fleet.identities[dev], deltas(3, DIM)[i])[0])
    d.feed(Tick(now_ms=11_000))
    assert _model(d).version == 1 and d.machine.round_id == 2


def test_overflow_discards_round_without_publishing(keypair, fleet, tmp_path) -> None:
    """A malicious enrolled device encrypts an out-of-range plaintext."""
    from edge_sdk.crypto import encrypt

    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=3)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    for i, dev in enumerate(fleet.ids()[:2]):
        d.send(make_update(ann, pk, fleet.identities[dev], deltas(2, DIM)[i])[0])
    ident = fleet.identities["dev05"]
    honest, _ = make_update(ann, pk, ident, deltas(1, DIM)[0])
    spec = d.machine.plan.packing
    evil = [(1 << (spec.slots_per_plaintext * spec.slot_bits)) - 1] * honest.num_ciphertexts
    blob = encrypt(pk, evil).to_bytes()
    unsigned = _forge(honest, ciphertexts=blob, ciphertext_digest=digest(blob))
    actions = d.send(_forge(unsigned, signature=ident.sign(unsigned.signing_bytes())))
    assert any(isinstance(a, Alert) and a.kind == "keyholder_overflow" for a in actions)
    rec = d.store.round_record(1)
    assert rec is not None and rec.phase == "failed" and rec.outcome == "overflow"
    assert _model(d).version == 0 and d.machine.round_id == 2
    assert not any(isinstance(a, Publish) and "/model/" in a.topic for a in actions)


def test_restart_from_store_resumes_round(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=4)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    ups = [
        make_update(ann, pk, fleet.identities[dev], deltas(4, DIM)[i])
        for i, dev in enumerate(fleet.ids()[:4])
    ]
    for upd, _ in ups[:2]:
        d.send(upd)
    d.store.close()
    # "crash": a fresh machine and store from the same file (the members run on)
    d2 = _driver(keypair, fleet, tmp_path, target=4)
    d2.members = d.members
    snap = d2.store.load_snapshot()
    assert snap is not None
    d2.machine.restore(snap)
    d2.feed(Start(now_ms=3_000))
    assert d2.machine.count == 2
    assert _statuses(d2.send(ups[1][0])) == ["duplicate"]
    for upd, _ in ups[2:]:
        d2.send(upd)
    res_vals = np.sum([v for _, v in ups], axis=0)
    rec = d2.store.round_record(1)
    assert rec is not None
    np.testing.assert_array_equal(round_outcome(rec.result)[1], res_vals)


def test_persist_actions_precede_receipts(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=4)
    d.feed(Start(now_ms=1_000))
    upd, _ = make_update(d.announcement(), pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    actions = d.send(upd)
    kinds = [type(a) for a in actions]
    assert kinds.index(PersistAccepted) < kinds.index(SendReceipt)
