"""A committee member releases a share only for a sum it verified on its own.

Real 2048-bit threshold key (2-of-3, safe primes), real signed device updates.
Each member sees the devices' updates as the broker delivers them
(``witness``) and checks every request before it releases its share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.committee import CommitteeVerifier, share_context
from aggregator.keyholder import KeyHolder
from aggregator.rounds import Start
from aggregator.threshold import DecryptionShare, InsufficientSharesError, combine, verify_share
from edge_sdk.crypto import CiphertextVector, sum_ciphertexts, unpack_sum
from edge_sdk.errors import InvalidSignatureError
from edge_sdk.protocol import ContributorProof, EncryptedUpdate, KeyholderRequest, Topics
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import (
    FED,
    Committee,
    Fleet,
    deltas,
    make_keyholders,
    make_machine,
    make_update,
    update_messages,
)

committee = _support.committee  # session fixture

DIM = 30


@pytest.fixture
def setup(committee: Committee, tmp_path: Path) -> dict[str, Any]:
    pk = committee.public_key
    fleet = Fleet.create(5, tmp_path / "reg.json")
    machine = make_machine(pk, fleet, dim=DIM, committee=committee)
    machine.handle(Start(now_ms=1))
    ann = machine.announcement
    assert ann is not None
    ups: list[tuple[EncryptedUpdate, Any]] = [
        make_update(ann, pk, fleet.identities[d], deltas(5, DIM)[i])
        for i, d in enumerate(fleet.ids())
    ]
    return {
        "pk": pk,
        "fleet": fleet,
        "plan": machine.plan,
        "spec": machine.plan.packing,
        "ups": ups,
        "committee": committee,
    }


def _members(s: dict[str, Any], *, witness: int = 5, **kw: Any) -> list[KeyHolder]:
    members = make_keyholders(s["committee"], s["fleet"], min_clients=kw.pop("min_clients", 3))
    for member in members:
        for update, _ in s["ups"][:witness]:
            for topic, payload in update_messages(update):
                assert member.witness(topic, payload) in ("stored", "partial")
    return members


def _request(
    s: dict[str, Any],
    ups: list[EncryptedUpdate],
    *,
    round_id: int = 1,
    proofs: tuple[ContributorProof, ...] | None = None,
    request_id: str = "req1",
    encrypted_sum: bytes | None = None,
) -> KeyholderRequest:
    pk = s["pk"]
    vectors = [CiphertextVector.from_bytes(u.ciphertexts, pk, u.num_ciphertexts) for u in ups]
    total = sum_ciphertexts(pk, vectors, workers=1)
    return KeyholderRequest(
        federation=FED,
        round_id=round_id,
        request_id=request_id,
        packing=s["spec"].to_bytes(),
        packing_digest=s["spec"].digest(),
        privacy=s["plan"].privacy_field,
        contributors=KeyholderRequest.pack_proofs(
            proofs if proofs is not None else tuple(u.proof() for u in ups)
        ),
        encrypted_sum=encrypted_sum if encrypted_sum is not None else total.to_bytes(),
        issued_ms=10,
    )


def _decrypt(s: dict[str, Any], request: KeyholderRequest, members: list[KeyHolder]) -> np.ndarray:
    verifier = CommitteeVerifier(s["committee"].manifest)
    values = CiphertextVector.from_bytes(
        request.encrypted_sum, s["pk"], s["spec"].num_plaintexts(DIM)
    ).values
    shares = []
    for member in members:
        result = member.handle(request)
        assert result.status == "ok", result.reason
        share = verifier.check(request, values, result)
        assert share is not None
        shares.append(share)
    plaintexts = verifier.combine(len(values), shares)
    return unpack_sum(plaintexts, s["spec"], count=request.proofs().__len__(), length=DIM)


def test_any_two_of_three_decrypt_the_quorum_sum_exactly(setup: dict[str, Any]) -> None:
    members = _members(setup)
    ups = [u for u, _ in setup["ups"][:3]]
    request = _request(setup, ups)
    expected = np.sum([v for _, v in setup["ups"][:3]], axis=0)
    for pair in ((0, 1), (0, 2), (1, 2)):
        got = _decrypt(setup, request, [members[i] for i in pair])
        np.testing.assert_array_equal(got, expected)


def test_one_member_alone_cannot_decrypt(setup: dict[str, Any]) -> None:
    members = _members(setup)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    public = setup["committee"].manifest.public
    result = members[0].handle(request)
    share = DecryptionShare.from_bytes(result.share, public)
    with pytest.raises(InsufficientSharesError):
        combine(public, len(share.values), [share])


def test_results_are_signed_by_the_member(setup: dict[str, Any]) -> None:
    members = _members(setup)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    result = members[0].handle(request)
    forged = type(result)(
        **{f: getattr(result, f) for f in result.RULES if f not in ("holder_id", "signature")},
        holder_id="keyholder-2",
        signature=result.signature,
    )
    verifier = CommitteeVerifier(setup["committee"].manifest)
    values = CiphertextVector.from_bytes(request.encrypted_sum, setup["pk"], 1).values
    with pytest.raises(InvalidSignatureError):
        verifier.check(request, values, forged)


def test_a_corrupted_share_is_named_and_the_others_still_decrypt(setup: dict[str, Any]) -> None:
    members = _members(setup)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    public = setup["committee"].manifest.public
    good = DecryptionShare.from_bytes(members[0].handle(request).share, public)
    bad = DecryptionShare(
        index=good.index,
        values=(good.values[0] * 2 % public.nsquare, *good.values[1:]),
        challenge=good.challenge,
        response=good.response,
    )
    values = CiphertextVector.from_bytes(
        request.encrypted_sum, setup["pk"], setup["spec"].num_plaintexts(DIM)
    ).values
    with pytest.raises(Exception) as info:
        verify_share(public, values, bad, context=share_context(request))
    assert getattr(info.value, "index", None) == 1
    got = _decrypt(setup, request, members[1:])
    np.testing.assert_array_equal(got, np.sum([v for _, v in setup["ups"][:3]], axis=0))


def test_refuses_min_clients_minus_one(setup: dict[str, Any]) -> None:
    members = _members(setup)
    result = members[0].handle(_request(setup, [u for u, _ in setup["ups"][:2]]))
    assert result.status == "refused" and result.reason == "quorum" and result.share == b""


def test_refuses_duplicate_contributor(setup: dict[str, Any]) -> None:
    members = _members(setup)
    ups = [u for u, _ in setup["ups"][:2]]
    proofs = (ups[0].proof(), ups[1].proof(), ups[0].proof())
    result = members[0].handle(_request(setup, ups, proofs=proofs))
    assert result.status == "refused" and result.reason == "duplicate_contributor"


def test_refuses_unregistered_or_forged_proofs(setup: dict[str, Any], tmp_path: Path) -> None:
    ups = [u for u, _ in setup["ups"][:3]]
    # the member's own registry lacks dev02: the aggregator's registry does not count
    own = Fleet(setup["fleet"].identities, type(setup["fleet"].registry)(tmp_path / "kh.json"))
    for d in ("dev00", "dev01"):
        own.registry.enroll(d, setup["fleet"].identities[d].public_key_bytes, now_ms=1)
    member = make_keyholders(setup["committee"], own, min_clients=3)[0]
    for update in ups:
        for topic, payload in update_messages(update):
            member.witness(topic, payload)
    assert member.handle(_request(setup, ups)).reason == "proof_unknown_device"
    other = _members(setup)[0]
    p = ups[2].proof()
    fields = {f: getattr(p, f) for f in p.RULES}
    fields["signature"] = bytes(64)
    forged = (ups[0].proof(), ups[1].proof(), ContributorProof(**fields))
    assert other.handle(_request(setup, ups, proofs=forged)).reason == "proof_invalid_signature"


def test_refuses_proofs_of_another_round(setup: dict[str, Any]) -> None:
    members = _members(setup)
    ups = [u for u, _ in setup["ups"][:3]]
    assert members[0].handle(_request(setup, ups, round_id=2)).reason == "proof_mismatch"


def test_refuses_a_noise_spec_other_than_the_contributors(setup: dict[str, Any]) -> None:
    members = _members(setup)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    fields = {f: getattr(request, f) for f in request.RULES}
    fields["privacy"] = b"\x80"  # an empty map: not the spec the devices applied
    assert members[0].handle(KeyholderRequest(**fields)).status == "refused"


def test_one_sum_per_round_but_idempotent(setup: dict[str, Any]) -> None:
    members = _members(setup)
    a = _request(setup, [u for u, _ in setup["ups"][:3]])
    assert members[0].handle(a).status == "ok"
    assert members[0].handle(a).status == "ok"  # the same request again (aggregator restart)
    b = _request(setup, [u for u, _ in setup["ups"][1:4]], request_id="req2")
    result = members[0].handle(b)
    assert result.status == "refused" and result.reason == "round_already_decrypted"


def test_single_ciphertext_sum_is_refused_by_every_member(setup: dict[str, Any]) -> None:
    members = _members(setup)
    ups = [u for u, _ in setup["ups"][:3]]
    # three genuine proofs, but the "sum" is dev00's ciphertexts alone
    lying = _request(setup, ups, encrypted_sum=ups[0].ciphertexts)
    assert {m.handle(lying).reason for m in members} == {"verify_sum_mismatch"}
    honest = _request(setup, ups)
    assert all(m.handle(honest).status == "ok" for m in members)


def test_sum_over_another_device_list_is_refused(setup: dict[str, Any]) -> None:
    members = _members(setup)
    ups = [u for u, _ in setup["ups"]]
    # proofs of dev00-02, but the sum of dev00, dev01 and dev03
    lying = _request(
        setup,
        ups[:3],
        encrypted_sum=_request(setup, [ups[0], ups[1], ups[3]]).encrypted_sum,
    )
    assert {m.handle(lying).reason for m in members} == {"verify_sum_mismatch"}


def test_unwitnessed_contributor_is_refused(setup: dict[str, Any]) -> None:
    members = _members(setup, witness=2)  # dev02's update never reached the members
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    assert members[0].missing(request) == 1
    assert members[0].handle(request).reason == "verify_ciphertext_missing"


def test_replayed_sum_of_an_earlier_round_is_refused(setup: dict[str, Any]) -> None:
    members = _members(setup)
    ups = [u for u, _ in setup["ups"][:3]]
    r1 = _request(setup, ups)
    assert members[0].handle(r1).status == "ok"
    fields = {f: getattr(r1, f) for f in r1.RULES}
    fields.update(round_id=2, request_id="r2")
    # same sum, same proofs, relabelled round 2: the proofs name round 1
    assert members[0].handle(KeyholderRequest(**fields)).status == "refused"
    assert members[1].handle(KeyholderRequest(**fields)).status == "refused"


def test_bogus_future_round_update_changes_nothing(setup: dict[str, Any]) -> None:
    members = _members(setup)
    honest = setup["ups"][0][0]
    # an enrolled device publishes an update for round 1001 with a random signature
    fields = {f: getattr(honest, f) for f in honest.RULES}
    fields.update(round_id=1001, signature=bytes(range(64)))
    bogus = EncryptedUpdate(**fields)
    for topic, payload in update_messages(bogus):
        assert members[0].witness(topic, payload) in ("bad_signature", "partial")
    # and one validly signed by the device itself, far in the future
    ident = setup["fleet"].identities["dev01"]
    signed = dict(fields, device_id="dev01")
    signed["signature"] = ident.sign(EncryptedUpdate(**signed).signing_bytes())
    for topic, payload in update_messages(EncryptedUpdate(**signed)):
        members[0].witness(topic, payload)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    assert members[0].missing(request) == 0
    assert members[0].handle(request).status == "ok"


def test_witness_state_is_bounded_per_device(setup: dict[str, Any]) -> None:
    members = _members(setup)
    member = members[0]
    ident = setup["fleet"].identities["dev04"]
    honest = setup["ups"][4][0]
    for r in range(2, 40):
        fields = {f: getattr(honest, f) for f in honest.RULES}
        fields["round_id"] = r
        fields["signature"] = ident.sign(EncryptedUpdate(**fields).signing_bytes())
        for topic, payload in update_messages(EncryptedUpdate(**fields)):
            member.witness(topic, payload)
    assert len(member._seen["dev04"]) == member.witness_rounds
    # other devices' updates are untouched
    assert member.witnessed("dev00", 1) == setup["ups"][0][0].ciphertext_digest


def test_chunks_on_another_devices_topic_are_ignored(setup: dict[str, Any]) -> None:
    member = make_keyholders(setup["committee"], setup["fleet"], min_clients=3)[0]
    update = setup["ups"][0][0]
    outcomes = {
        member.witness(Topics(FED).updates("dev03"), payload)
        for _, payload in update_messages(update)
    }
    assert outcomes == {"topic_mismatch"}
    assert member.witnessed("dev00", 1) is None and member.witnessed("dev03", 1) is None
