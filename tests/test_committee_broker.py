"""A 2-of-3 key-holder committee of real member processes through Mosquitto with mTLS.

Every party (aggregator, each member, each device, and the test's hostile
clients) connects with its own certificate from firmware_sim.pki; the broker
enforces the ACL generated for the committee (tests/committee_helpers.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.committee import CommitteeManifest, request_digest, share_context
from aggregator.keyholder_config import load_member_dir
from aggregator.threshold import decryption_share
from edge_sdk.crypto import CiphertextVector, sum_ciphertexts
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.protocol import (
    Chunk,
    KeyholderCommit,
    KeyholderRequest,
    KeyholderResult,
    Reassembler,
    Topics,
    split_payload,
)
from edge_sdk.transport import InboundMessage
from tests import test_aggregator_support as _support
from tests.committee_helpers import (
    DEVICES,
    HOLDERS,
    MIN_CLIENTS,
    Env,
    ResultReader,
    make_env,
    publish_request,
    relabel,
    wait_for,
)
from tests.reliability_helpers import FED

pytestmark = pytest.mark.broker

keypair = _support.keypair  # session fixture


@pytest.fixture
def env(tmp_path: Path, keypair: object) -> Iterator[Env]:
    from tests.conftest import _require_mosquitto

    _require_mosquitto()
    made = make_env(tmp_path, keypair)  # type: ignore[arg-type]
    try:
        yield made
    finally:
        made.close()


def _summed(env: Env, round_id: int, devices: tuple[str, ...]) -> bytes:
    pk = env.public_key
    ups = env.updates[round_id]
    vectors = [
        CiphertextVector.from_bytes(ups[d].ciphertexts, pk, ups[d].num_ciphertexts) for d in devices
    ]
    return sum_ciphertexts(pk, vectors).to_bytes()


def _request(env: Env, round_id: int) -> KeyholderRequest:
    rec = env.record(round_id)
    assert rec is not None and rec.request
    return KeyholderRequest.from_bytes(rec.request)


# ------------------------------------------------------------------ honest rounds


def test_honest_rounds_close_with_three_member_processes(env: Env) -> None:
    env.committee.start()
    env.start_service()
    env.start_devices()
    for round_id in (1, 2):
        env.close_round(round_id)
        results = env.check_released(round_id)
        oks = {r.holder_id for r in results if r.status == "ok"}
        assert len(oks) >= 2 and oks <= set(HOLDERS)
    for holder in HOLDERS:  # one request digest per answered round, no plaintext
        state = env.state(holder)
        assert set(state) <= {"1", "2"}
        for r, digest in state.items():
            assert digest == request_digest(_request(env, int(r))).hex()


def test_round_closes_with_one_member_offline(env: Env) -> None:
    env.committee.start(only=[0, 1, 2])  # keyholder-4 never runs
    env.start_service()
    env.start_devices()
    env.close_round(1)
    results = env.check_released(1)
    assert {r.holder_id for r in results if r.status == "ok"} <= {
        "keyholder-1",
        "keyholder-2",
        "keyholder-3",
    }
    assert len({r.holder_id for r in results if r.status == "ok"}) >= 2
    assert env.state("keyholder-4") == {}


def test_a_member_that_missed_every_update_gets_them_relayed(env: Env) -> None:
    """Its broker session never saw the updates (it first connects after them):
    it names them in a signed gap notice, the aggregator relays the devices'
    own updates through the ACL'd broker, and the round closes."""
    env.committee.start(only=[1, 2])  # keyholder-2 and -3: the commit quorum (3) needs one more
    env.start_service()
    env.start_devices()
    env.send(1)
    wait_for(lambda: env.phase(1) == "decrypting", "the request")
    time.sleep(1.5)  # re-asks: two members cannot reach the commit quorum
    assert env.phase(1) == "decrypting"
    env.member("keyholder-1").start()  # a fresh session: none of the updates is queued for it
    wait_for(lambda: env.phase(1) == "done", "round 1 after the relay", timeout=40)
    env.check_released(1)  # the exact sum of the four devices
    assert env.service is not None
    assert env.service.service.relayed == 4  # every update, once
    metrics = env.service.service.metrics
    assert metrics.value("edgefl_witness_relayed_total", holder="keyholder-1") == 4
    assert env.state("keyholder-1") == {"1": request_digest(_request(env, 1)).hex()}
    relay = env.root / "fed" / "agg.db.relay"
    wait_for(lambda: not (relay / "1.log").exists(), "the kept copies of round 1 deleted")


# ------------------------------------------------------------------ SIGKILL and restart


def test_member_killed_mid_round_restarts_and_never_answers_two_sums(env: Env) -> None:
    env.committee.start(only=[0, 1, 2])  # commit quorum 3 of these three: keyholder-1 is needed
    env.start_service()
    env.start_devices()
    first = DEVICES[:-1]
    env.send(1, first)
    wait_for(lambda: env.witnessed("keyholder-1", 1, first), "keyholder-1's witness")
    env.member("keyholder-1").kill()  # SIGKILL: power loss mid-round
    # the last update and the aggregator's request arrive while it is dead
    env.send(1, DEVICES[-1:])
    wait_for(lambda: env.phase(1) == "decrypting", "the request")
    time.sleep(1.5)  # a re-ask or two go unanswered by the dead member
    assert env.phase(1) == "decrypting"
    env.member("keyholder-1").start()
    # nothing is resent: the three updates come back from its witness files, the
    # fourth and the request from its durable broker session (or a re-ask)
    wait_for(lambda: env.phase(1) == "done", "round 1 after the restart", timeout=30)
    results = env.check_released(1)
    released = {r.holder_id for r in results if r.status == "ok"}
    assert len(released) >= 2 and released <= {"keyholder-1", "keyholder-2", "keyholder-3"}
    digest = request_digest(_request(env, 1)).hex()
    assert env.state("keyholder-1") == {"1": digest}
    # killed between rounds, restarted: round 2 still closes
    env.member("keyholder-1").kill()
    env.member("keyholder-1").start()
    env.close_round(2)
    env.check_released(2)
    assert set(env.state("keyholder-1")) == {"1", "2"}
    assert env.state("keyholder-1")["1"] == digest
    # a second, different sum for round 1 (a valid sum of three of its devices)
    env.stop_service()
    genuine = _request(env, 1)
    proofs = tuple(env.updates[1][d].proof() for d in first)
    other = relabel(
        genuine,
        request_id="r1-again",
        contributors=KeyholderRequest.pack_proofs(proofs),
        encrypted_sum=_summed(env, 1, first),
    )
    attacker = env.transport("aggregator")
    reader = ResultReader(attacker)
    attacker.connect(timeout=30)
    publish_request(attacker, other)
    answers = reader.answers(
        "r1-again", ("keyholder-1", "keyholder-2"), lambda: publish_request(attacker, other)
    )
    for holder in ("keyholder-1", "keyholder-2"):
        assert answers[holder].status == "refused"
        assert answers[holder].reason == "round_already_decrypted"
        assert answers[holder].share == b""
    assert env.state("keyholder-1")["1"] == digest


# ------------------------------------------------------------------ attacks


def test_attacks_are_refused_by_every_member_and_honest_rounds_keep_closing(env: Env) -> None:
    env.committee.start()
    env.start_service()
    env.start_devices()
    env.close_round(1)
    env.check_released(1)
    round1 = _request(env, 1)
    # round 2 is announced; its updates reach the members; the aggregator is
    # replaced by a hostile client holding the aggregator's certificate
    wait_for(lambda: 2 in env.announcements, "round 2")
    env.stop_service()
    env.send(2)
    for holder in HOLDERS:
        wait_for(lambda h=holder: env.witnessed(h, 2), f"{holder}'s witness of round 2")
    ups = env.updates[2]
    quorum = DEVICES[:MIN_CLIENTS]
    proofs = KeyholderRequest.pack_proofs(tuple(ups[d].proof() for d in quorum))
    base = relabel(
        round1,
        round_id=2,
        contributors=proofs,
        encrypted_sum=_summed(env, 2, quorum),
        issued_ms=round1.issued_ms + 1,
    )
    other_list = (*DEVICES[: MIN_CLIENTS - 1], DEVICES[-1])
    attacks = {
        # genuine proofs of min_clients devices, one device's ciphertexts as the "sum"
        "single": (
            relabel(base, request_id="a-single", encrypted_sum=ups[DEVICES[0]].ciphertexts),
            "verify_sum_mismatch",
        ),
        # the sum over another device list than the proofs'
        "other_list": (
            relabel(base, request_id="a-list", encrypted_sum=_summed(env, 2, other_list)),
            "verify_sum_mismatch",
        ),
        # round 1's released sum replayed for round 2 with round 2's proofs
        "replay_sum": (
            relabel(base, request_id="a-replay", encrypted_sum=round1.encrypted_sum),
            "verify_sum_mismatch",
        ),
        # round 1's whole request relabelled as round 2
        "relabelled": (relabel(round1, request_id="a-relabel", round_id=2), "proof_mismatch"),
    }
    attacker = env.transport("aggregator")
    reader = ResultReader(attacker)
    attacker.connect(timeout=30)
    for request, _ in attacks.values():
        publish_request(attacker, request)
    for name, (request, reason) in attacks.items():
        answers = reader.answers(
            request.request_id, HOLDERS, lambda r=request: publish_request(attacker, r)
        )
        for holder in HOLDERS:
            got = answers[holder]
            assert (got.status, got.reason) == ("refused", reason), (name, holder, got)
            assert got.share == b""
    for holder in HOLDERS:
        assert "2" not in env.state(holder)
    # bogus future-round updates from an enrolled device, with its own certificate
    victim = DEVICES[0]
    honest = ups[victim]
    future = dataclasses.replace(honest, round_id=honest.round_id + 1000, signature=os.urandom(64))
    signed = dataclasses.replace(honest, round_id=honest.round_id + 1000)
    signed = dataclasses.replace(
        signed, signature=env.identities[victim].sign(signed.signing_bytes())
    )
    env.publish_update(future)
    env.publish_update(signed)
    for holder in HOLDERS:
        wait_for(
            lambda h=holder: env.witnessed(h, honest.round_id + 1000, (victim,)),
            f"{holder} witnessing the signed future update",
        )
    attacker.close()
    # the honest aggregator comes back: round 2 (and round 3) still close
    env.start_service()
    env.close_round(2)
    env.check_released(2)
    env.close_round(3)
    env.check_released(3)


# ------------------------------------------------------------------ a corrupted share


def test_corrupted_share_is_named_and_the_round_decrypts_with_the_others(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    env.committee.start(only=[1, 2])
    # keyholder-3 goes offline after its durable session exists: the broker
    # queues the round's updates and the request for it
    env.member("keyholder-3").stop()
    folder = env.holder_dir("keyholder-1")
    manifest = CommitteeManifest.load(folder.parent / "committee.json")
    registry = DeviceRegistry.load(folder.parent.parent / "registry.json")
    member = load_member_dir(
        folder,
        manifest=manifest,
        registry=registry,
        min_clients=MIN_CLIENTS,
        passphrase=None,
        allow_unencrypted=True,
        verify_sums=False,
    )
    identity = DeviceIdentity.load(folder / "identity.key")
    n2 = env.public_key.n**2
    spoof = env.transport("keyholder-1")  # keyholder-1's certificate: its topic only
    asm = Reassembler(max_payload_size=1 << 26)
    sent: list[int] = []

    def on_request(msg: InboundMessage) -> None:
        whole = asm.add(Chunk.from_bytes(msg.payload))
        if whole is None:
            return
        request = KeyholderRequest.from_bytes(whole)
        commit = member.handle(request)
        assert isinstance(commit, KeyholderCommit), commit
        # the spoofing member commits like an honest one (so the others can release) ...
        spoof.publish(Topics(FED).keyholder_commit("keyholder-1"), commit.to_bytes())
        # ... and sends a corrupted share of its own
        values = CiphertextVector.from_bytes(
            request.encrypted_sum,
            env.public_key,
            len(request.encrypted_sum) // env.public_key.ciphertext_bytes,
        ).values
        share = decryption_share(member.share, values, context=share_context(request))
        result = member._result(
            request, "ok", "", len(request.proofs()), share.to_bytes(manifest.public)
        )
        bad = dataclasses.replace(share, values=((share.values[0] * 2) % n2, *share.values[1:]))
        unsigned = dataclasses.replace(result, share=bad.to_bytes(manifest.public), signature=b"")
        forged = dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))
        topic = Topics(FED).keyholder_result("keyholder-1")
        for piece in split_payload(
            forged.to_bytes(),
            federation=FED,
            stream="model",
            sender="keyholder-1",
            round_id=request.round_id,
            max_message_size=spoof.max_message_size,
        ):
            spoof.publish(topic, piece.to_bytes(), qos=1)
        sent.append(request.round_id)

    spoof.subscribe(Topics(FED).keyholder_request, on_request, qos=1)
    spoof.connect(timeout=30)
    service = env.start_service()
    env.start_devices()
    env.send(1)
    wait_for(lambda: service.machine.stats["keyholder_bad_share"] >= 1, "the bad share")
    assert env.phase(1) == "decrypting"  # keyholder-2's good share alone is not enough
    assert any(
        "keyholder_bad_share" in r.getMessage() and "keyholder-1" in r.getMessage()
        for r in caplog.records
    )
    env.member("keyholder-3").start()
    env.close_round(1)
    results = env.check_released(1)
    assert {r.holder_id for r in results if r.status == "ok"} == {"keyholder-2", "keyholder-3"}
    assert all(isinstance(r, KeyholderResult) for r in results)
    assert sent and sent[0] == 1


# ------------------------------------------------------------------ found by this suite, fixed
# A member used to defer such a request for witness_grace_s (its updates were
# forgotten on purpose) and refuse it only on a re-ask.


def test_second_sum_for_an_answered_round_is_refused_at_once(env: Env) -> None:
    env.committee.start()
    env.start_service()
    env.start_devices()
    env.close_round(1)
    env.stop_service()
    genuine = _request(env, 1)
    three = DEVICES[:MIN_CLIENTS]
    other = relabel(
        genuine,
        request_id="r1-once",
        contributors=KeyholderRequest.pack_proofs(tuple(env.updates[1][d].proof() for d in three)),
        encrypted_sum=_summed(env, 1, three),
    )
    attacker = env.transport("aggregator")
    reader = ResultReader(attacker)
    attacker.connect(timeout=30)
    publish_request(attacker, other)  # asked once, no re-ask
    wait_for(
        lambda: len(reader.by_request.get("r1-once", {})) == len(HOLDERS),
        "immediate refusals",
        timeout=6.0,
    )
    for result in reader.by_request["r1-once"].values():
        assert (result.status, result.reason) == ("refused", "round_already_decrypted")
