"""Fuzzing the aggregator's message handler: ``RoundMachine.handle(MessageReceived(...))``.

The decoders are fuzzed on their own in ``test_fuzz_decoders.py``; this file
drives the whole validation path of the round machine (topic, chunk,
reassembly, update decode, signature, round, spec, shape, ciphertexts) with
garbage and with mutations of real signed updates, on update topics.

Invariants for every generated message:

* ``handle`` never raises (the service would exit on an exception);
* every :class:`Rejected` action is counted: in ``machine.rejections`` by
  precise reason, or in ``machine.stats["late"]`` for late updates;
* nothing is summed unless it is byte-for-byte an honest device's update
  (a mutation is never accepted), and the pending reassembly memory stays
  within its bound.

Budget: ``EDGEFL_FUZZ_EXAMPLES`` (default 300) on every run; the ``slow``
test runs 10,000 generated payloads.
"""

from __future__ import annotations

import os
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.rounds import MessageReceived, PersistAccepted, Rejected, RoundMachine, Start
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey
from edge_sdk.protocol import EncryptedUpdate, Topics
from edge_sdk.protocol.messages import digest
from tests import test_aggregator_support as _support
from tests.reliability_helpers import malformed_payloads
from tests.test_aggregator_support import FED, Fleet, deltas, make_machine, make_update
from tests.test_aggregator_support import update_messages as _chunks

keypair = _support.keypair  # session fixture

DIM = 40
N_DEVICES = 6
N_HONEST = 3  # devices 0-2 send honest updates; 3-5 only updates they re-signed after damage
EXAMPLES = int(os.environ.get("EDGEFL_FUZZ_EXAMPLES", "300"))
TOPICS = Topics(FED)


class Target:
    """One machine shared by all examples of a run, and what it was fed."""

    def __init__(self, keys: tuple[PaillierPublicKey, PaillierPrivateKey], folder: Path) -> None:
        pk, _ = keys
        fleet = Fleet.create(N_DEVICES, folder / "registry.json")
        self.machine: RoundMachine = make_machine(
            pk, fleet, dim=DIM, min_clients=3, target=16, duration_ms=10**12
        )
        self.machine.handle(Start(now_ms=1_000))
        ann = self.machine.announcement
        assert ann is not None
        self.updates: list[EncryptedUpdate] = []
        self.identities = fleet.identities
        for i, dev in enumerate(fleet.ids()):
            upd, _ = make_update(ann, pk, fleet.identities[dev], deltas(N_DEVICES, DIM)[i])
            self.updates.append(upd)
        self.honest_digests = {u.update_digest for u in self.updates}
        self.signed_by_owner: set[bytes] = set()
        self.fed = 0
        self.rejected_actions = 0

    def handle(self, topic: str, payload: bytes) -> None:
        m = self.machine
        counted_before = sum(m.rejections.values()) + m.stats["late"]
        actions = m.handle(MessageReceived(topic=topic, payload=payload, now_ms=2_000))
        self.fed += 1
        rejected = [a for a in actions if isinstance(a, Rejected)]
        self.rejected_actions += len(rejected)
        assert sum(m.rejections.values()) + m.stats["late"] - counted_before == len(rejected)
        for action in actions:
            if isinstance(action, PersistAccepted):
                allowed = self.honest_digests | self.signed_by_owner
                assert action.update_digest in allowed, "a mutation was summed"
        held = m.intake.pending_bytes()  # per device, each bounded on its own
        assert all(b <= m.intake.max_pending * m.intake.max_update_bytes for b in held.values())
        assert len(held) <= m.intake.max_devices


@pytest.fixture(scope="module")
def target(
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey], tmp_path_factory: pytest.TempPathFactory
) -> Target:
    return Target(keypair, tmp_path_factory.mktemp("fuzz-handler"))


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    payload = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not payload:
            break
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "c1", "zero"]))
        pos = draw(st.integers(0, len(payload) - 1))
        if op == "flip":
            payload[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del payload[pos:]
        elif op == "insert":
            payload[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "dup":
            payload[pos:pos] = payload[pos : pos + draw(st.integers(1, 16))]
        elif op == "c1":
            payload[pos] = 0xC1
        else:
            end = pos + draw(st.integers(1, 64))
            payload[pos:end] = bytes(len(payload[pos:end]))
    return bytes(payload)


def _forged(
    draw: st.DrawFn, upd: EncryptedUpdate, ident: Any, signed_by_owner: set[bytes]
) -> bytes:
    """The device's own key signs a damaged update: reaches the checks after the signature."""
    fields = {f: getattr(upd, f) for f in upd.RULES}
    what = draw(st.sampled_from(["blob", "spec", "shape", "round", "key"]))
    if what == "blob":
        width = len(upd.ciphertexts)
        blob = draw(
            st.binary(min_size=max(0, width - 2), max_size=width + 2)
            | st.sampled_from([bytes(width), b"\xff" * width])
        )
        fields.update(ciphertexts=blob, ciphertext_digest=digest(blob))
    elif what == "spec":
        fields["packing_digest"] = draw(st.binary(min_size=32, max_size=32))
    elif what == "shape":
        fields["num_params"] = draw(st.integers(1, 10_000))
    elif what == "round":
        fields["round_id"] = draw(st.integers(0, 5))
    else:
        fields["key_fingerprint"] = draw(st.binary(min_size=32, max_size=32))
    try:
        unsigned = EncryptedUpdate(**fields)
    except (TypeError, ValueError):
        return upd.to_bytes()[:-1]  # an invalid combination: send a truncated update
    fields["signature"] = ident.sign(unsigned.signing_bytes())
    forged = EncryptedUpdate(**fields)
    signed_by_owner.add(forged.update_digest)  # its own key: it may legitimately be summed
    return forged.to_bytes()


@st.composite
def messages(draw: st.DrawFn, target: Target) -> tuple[str, bytes]:
    """(topic, payload): garbage, mutated chunks, or well-chunked mutated updates."""
    upd = draw(st.sampled_from(target.updates))
    updates = target.updates
    own = TOPICS.updates(upd.device_id)
    kind = draw(
        st.sampled_from(["garbage", "chunk", "update", "forged", "topic", "honest", "hostile"])
    )
    if kind == "garbage":
        return own, draw(st.binary(max_size=600))
    if kind == "hostile":
        return own, draw(st.sampled_from(sorted(malformed_payloads(upd.device_id).values())))
    if kind == "chunk":  # the chunk envelope itself is damaged
        size = draw(st.sampled_from([128 * 1024, 1400]))
        parts = list(_chunks(upd, max_message_size=size))
        topic, payload = draw(st.sampled_from(parts))
        return topic, _mutate(draw, payload)
    if kind in ("update", "forged"):  # a valid chunk around damaged update bytes
        if kind == "update":
            body = _mutate(draw, upd.to_bytes()) or b"\x00"
        else:
            upd = draw(st.sampled_from(updates[N_HONEST:]))  # devices that never sent honestly
            own = TOPICS.updates(upd.device_id)
            body = _forged(draw, upd, target.identities[upd.device_id], target.signed_by_owner)
        from edge_sdk.protocol import split_payload

        chunk = split_payload(
            body,
            federation=FED,
            stream="update",
            sender=upd.device_id,
            round_id=upd.round_id,
            max_message_size=128 * 1024,
        )[0]
        return own, chunk.to_bytes()
    if kind == "topic":  # an honest payload on a wrong or malformed topic
        other = draw(
            st.sampled_from(
                [
                    TOPICS.updates("d-unknown"),
                    TOPICS.updates(draw(st.sampled_from(updates)).device_id),
                    f"edgefl/v1/otherfed/updates/{upd.device_id}",
                    f"edgefl/v1/{FED}/status/{upd.device_id}",
                    "edgefl/v1",
                    draw(st.text(max_size=40)),
                ]
            )
        )
        return other, next(iter(_chunks(upd)))[1]
    upd = draw(st.sampled_from(updates[:N_HONEST]))
    # honest: accepted once, then duplicate
    return TOPICS.updates(upd.device_id), next(iter(_chunks(upd)))[1]


FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    database=None,
)


@given(data=st.data())
@settings(FUZZ, max_examples=EXAMPLES)
def test_handler_survives_and_counts_every_rejection(target: Target, data: st.DataObject) -> None:
    target.handle(*data.draw(messages(target)))


@pytest.mark.slow
@pytest.mark.timeout(600)
@given(data=st.data())
@settings(FUZZ, max_examples=10_000)
def test_handler_survives_10000_generated_payloads(target: Target, data: st.DataObject) -> None:
    target.handle(*data.draw(messages(target)))


def test_fuzzing_reached_rejections_and_acceptances(target: Target) -> None:
    # runs after the fuzzers in this module: they exercised both outcomes
    print(f"fuzzed {target.fed} messages; rejections {dict(target.machine.rejections)}")
    assert target.fed >= min(EXAMPLES, 50)
    assert target.rejected_actions > 0
    assert sum(target.machine.rejections.values()) > 0
    assert 0 < target.machine.count <= N_DEVICES
    # honest updates sent again were acknowledged as duplicates, counted, not re-summed
    assert target.machine.stats["duplicate"] > 0
    reasons = Counter(r.split("_")[0] for r in target.machine.rejections)
    assert {"decode", "topic"} <= set(reasons), target.machine.rejections


def test_hostile_payloads_cost_bounded_memory(target: Target) -> None:
    """Declared 4 GiB lengths, deep nesting: refused without allocating what they claim."""
    hostile = malformed_payloads("dev00")
    tracemalloc.start()
    try:
        for payload in hostile.values():
            target.handle(TOPICS.updates("dev00"), payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak
