"""Hostile input at the round machine (issue 9, cases 10, 13 and 15), real 2048-bit keys.

Covered elsewhere and not repeated here: bit flips, unknown signing keys,
revoked devices and c >= n^2 (``test_aggregator_rounds.py``). This file adds
the remaining ciphertext forgeries, the application size limit, and an
overflow-poisoned round followed by an honest one.

"Rejected before the sum" is checked directly: the encrypted running sum,
the count and the store are unchanged after each forgery.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator import rounds as rounds_module
from aggregator.keyholder import exchange
from aggregator.rounds import (
    Alert,
    KeyholderAnswered,
    MessageReceived,
    Publish,
    Rejected,
    RequestDecryption,
    Start,
    round_outcome,
)
from edge_sdk.crypto import CiphertextVector
from edge_sdk.crypto._raw import compute_obfuscator, pack_unsigned, random_unit, raw_encrypt
from edge_sdk.identity import DeviceIdentity
from edge_sdk.protocol import Chunk, EncryptedUpdate
from edge_sdk.protocol.messages import digest
from tests import test_aggregator_support as _support
from tests.test_aggregator_rounds import Driver, _driver
from tests.test_aggregator_support import (
    Fleet,
    deltas,
    make_keyholders,
    make_machine,
    make_update,
    update_messages,
)

keypair = _support.keypair  # session fixture

DIM = 40


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(8, tmp_path / "registry.json")


def _resigned(update: EncryptedUpdate, ident: Any, **changes: Any) -> EncryptedUpdate:
    """``update`` with fields changed and re-signed, as a malicious ENROLLED device would."""
    fields = {f: getattr(update, f) for f in update.RULES}
    fields.update(changes)
    unsigned = EncryptedUpdate(**fields)
    fields["signature"] = ident.sign(unsigned.signing_bytes())
    return EncryptedUpdate(**fields)


def _with_blob(update: EncryptedUpdate, ident: Any, blob: bytes) -> EncryptedUpdate:
    return _resigned(update, ident, ciphertexts=blob, ciphertext_digest=digest(blob))


def _reasons(actions: list[Any]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Rejected)]


def _state(d: Driver) -> tuple[Any, int, int]:
    return d.machine.encrypted_sum, d.machine.count, len(d.store.accepted(1))


def test_forged_ciphertexts_are_rejected_before_the_sum(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=8)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    # one honest update first, so "unchanged" means more than "still empty"
    honest, _ = make_update(ann, pk, fleet.identities["dev00"], deltas(1, DIM)[0])
    d.send(honest)
    before = _state(d)
    assert before[1] == 1
    width = pk.ciphertext_bytes
    n = pk.n
    forgeries = {
        "c = 0": (0).to_bytes(width, "big"),
        "c = n^2": pk.nsquare.to_bytes(width, "big"),
        "gcd(c, n) = n": n.to_bytes(width, "big"),
        "gcd(c, n) = n (c = 2n)": (2 * n).to_bytes(width, "big"),
        "one byte short": honest.ciphertexts[:-1],
        "one byte long": honest.ciphertexts + b"\x01",
    }
    expected = {
        "c = 0": "ciphertext_range",
        "c = n^2": "ciphertext_range",
        "gcd(c, n) = n": "ciphertext_not_unit",
        "gcd(c, n) = n (c = 2n)": "ciphertext_not_unit",
        "one byte short": "ciphertext_length",
        "one byte long": "ciphertext_length",
    }
    for i, (name, blob) in enumerate(forgeries.items()):
        ident = fleet.identities[f"dev0{1 + i % 7}"]
        # each forgery from a fresh device slot: a rejected update leaves no trace,
        # so one device may be reused only after its previous forgery was refused
        base, _ = make_update(ann, pk, ident, deltas(8, DIM)[1 + i % 7], seed=i)
        actions = d.send(_with_blob(base, ident, blob))
        assert _reasons(actions) == [expected[name]], name
        assert _state(d) == before, name
    # the forging devices were not locked out: a valid update is still accepted
    ok, _ = make_update(ann, pk, fleet.identities["dev01"], deltas(8, DIM)[1], seed=99)
    assert [a.receipt.status for a in d.send(ok) if hasattr(a, "receipt")] == ["accepted"]


def test_update_of_the_wrong_size_is_refused_before_parsing_big_integers(
    keypair, fleet, tmp_path, monkeypatch
) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=8)
    d.feed(Start(now_ms=1_000))
    ann = d.announcement()
    ident = fleet.identities["dev02"]
    honest, _ = make_update(ann, pk, ident, deltas(3, DIM)[2])
    parsed: list[int] = []
    real = CiphertextVector.from_bytes

    def counting(blob: bytes, public_key: Any, count: int) -> CiphertextVector:
        parsed.append(len(blob))
        return real(blob, public_key, count)

    monkeypatch.setattr(rounds_module.CiphertextVector, "from_bytes", staticmethod(counting))
    # more ciphertexts than the plan has: well-formed, signed, bigger updates
    for copies, reason in ((2, "wrong_shape"), (64, "chunk_too_large")):
        big = honest.ciphertexts * copies
        forged = _resigned(
            honest, ident, ciphertexts=big, ciphertext_digest=digest(big), num_ciphertexts=copies
        )
        assert _reasons(d.send(forged)) == [reason], copies
    assert parsed == []  # refused on the header, no big integer was built
    assert d.machine.count == 0


def test_chunk_declaring_more_than_an_update_is_refused_without_buffering(
    keypair, fleet, tmp_path
) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=8)
    d.feed(Start(now_ms=1_000))
    limit = d.machine.intake.max_update_bytes
    # the bound follows the plan: one ciphertext blob plus a small header
    assert limit == d.machine.plan.num_ciphertexts * pk.ciphertext_bytes + 4096
    topic = d.machine.topics.updates("dev03")
    for declared in (limit + 1, 10 * 1024 * 1024, 2**34):
        chunk = Chunk(
            federation=d.machine.config.federation,
            stream="update",
            sender="dev03",
            round_id=1,
            payload_digest=bytes(32),
            payload_size=declared,
            index=0,
            total=65_536,
            data=b"\0" * 1000,
        )
        actions = d.feed(MessageReceived(topic=topic, payload=chunk.to_bytes(), now_ms=2_000))
        assert _reasons(actions) == ["chunk_too_large"], declared
    assert d.machine.intake.pending_bytes() == {} and d.machine.intake.pending() == 0
    # an honest update from another device still goes through
    upd, _ = make_update(d.announcement(), pk, fleet.identities["dev04"], deltas(5, DIM)[4])
    assert [a.receipt.status for a in d.send(upd) if hasattr(a, "receipt")] == ["accepted"]


def _published_versions(d: Driver) -> set[int]:
    """Model versions the machine published (model chunks carry the version)."""
    return {
        Chunk.from_bytes(a.payload).round_id
        for a in d.log
        if isinstance(a, Publish) and "/model/" in a.topic
    }


def _poisoned(update: EncryptedUpdate, ident: Any, d: Driver, pk: Any) -> EncryptedUpdate:
    """Slots at 2^w - 1: a valid ciphertext of a plaintext no honest device can produce."""
    spec = d.machine.plan.packing
    slots = np.full(d.machine.plan.dimension, (1 << spec.slot_bits) - 1, dtype=np.uint64)
    plaintexts = pack_unsigned(slots, spec)
    values = [raw_encrypt(pk, m, compute_obfuscator(pk, random_unit(pk))) for m in plaintexts]
    return _with_blob(update, ident, CiphertextVector(pk, [int(v) for v in values]).to_bytes())


def test_overflow_poisoned_round_is_discarded_and_the_honest_rerun_passes(
    keypair, fleet, tmp_path
) -> None:
    pk, _ = keypair
    d = _driver(keypair, fleet, tmp_path, target=3)
    d.feed(Start(now_ms=1_000))
    ann1 = d.announcement()
    ids = fleet.ids()
    for i in range(2):
        d.send(make_update(ann1, pk, fleet.identities[ids[i]], deltas(3, DIM)[i])[0])
    evil_ident = fleet.identities[ids[2]]
    base, _ = make_update(ann1, pk, evil_ident, deltas(3, DIM)[2])
    actions = d.send(_poisoned(base, evil_ident, d, pk))
    # accepted into the sum (it is a valid ciphertext), then flagged at decryption
    assert any(isinstance(a, Alert) and a.kind == "keyholder_overflow" for a in actions)
    assert _published_versions(d) == {0}  # only the initial model, nothing poisoned
    rec1 = d.store.round_record(1)
    assert rec1 is not None and rec1.phase == "failed" and rec1.outcome == "overflow"
    assert round_outcome(rec1.result)[1] is None  # nothing released
    assert d.machine.model is not None and d.machine.model.version == 0
    # round 2: honest devices only
    ann2 = d.announcement()
    assert ann2.round_id == 2 and ann2.model_version == 0
    values = []
    for i in range(3, 6):
        upd, vals = make_update(ann2, pk, fleet.identities[ids[i]], deltas(6, DIM)[i], seed=2)
        values.append(vals)
        d.send(upd)
    rec2 = d.store.round_record(2)
    assert rec2 is not None and rec2.phase == "done"
    np.testing.assert_array_equal(round_outcome(rec2.result)[1], np.sum(values, axis=0))
    model = d.machine.model
    assert model is not None and model.version == 1 and model.round_id == 2
    expected = (np.sum(values, axis=0) / d.machine.plan.packing.scale / 3).astype(np.float32)
    np.testing.assert_array_equal(np.frombuffer(model.weights, "<f4"), expected)
    assert _published_versions(d) == {0, 1}


def test_forged_keyholder_result_is_refused_and_the_genuine_one_applies(
    keypair, fleet, tmp_path
) -> None:
    pk, _ = keypair
    committee = _support._default_committee()
    members = make_keyholders(committee, fleet)
    machine = make_machine(pk, fleet, dim=DIM, target=3, committee=committee)
    machine.handle(Start(now_ms=1_000))
    ann = machine.announcement
    assert ann is not None
    requests = []
    for i, dev in enumerate(fleet.ids()[:3]):
        upd, _ = make_update(ann, pk, fleet.identities[dev], deltas(3, DIM)[i])
        for topic, payload in update_messages(upd):
            for member in members:
                member.witness(topic, payload)
            actions = machine.handle(MessageReceived(topic=topic, payload=payload, now_ms=2_000))
            requests += [a.request for a in actions if isinstance(a, RequestDecryption)]
    (request,) = requests
    answers = exchange(members, request)  # the commit phase, then each member's share
    genuine = answers[0]
    # the same share re-signed by a key that is not the member's own
    impostor = DeviceIdentity.generate("keyholder-1")
    forged = dataclasses.replace(genuine, signature=impostor.sign(genuine.signed_bytes()))
    assert forged.share == genuine.share and forged.signature != genuine.signature
    actions = machine.handle(KeyholderAnswered(result=forged, now_ms=3_000))
    assert _reasons(actions) == ["keyholder_signature"]
    assert any(isinstance(a, Alert) and a.kind == "keyholder_signature" for a in actions)
    assert machine.phase == "decrypting" and machine.model is not None
    assert machine.model.version == 0
    machine.handle(KeyholderAnswered(result=genuine, now_ms=3_000))
    assert machine.model.version == 0  # one share of two
    machine.handle(KeyholderAnswered(result=answers[2], now_ms=3_000))
    assert machine.model.version == 1 and machine.round_id == 2
