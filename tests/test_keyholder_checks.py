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
from aggregator.keyholder import KeyHolder, exchange
from aggregator.rounds import Start
from aggregator.threshold import DecryptionShare, InsufficientSharesError, combine, verify_share
from edge_sdk.crypto import CiphertextVector, sum_ciphertexts, unpack_sum
from edge_sdk.errors import InvalidSignatureError
from edge_sdk.protocol import (
    ContributorProof,
    EncryptedUpdate,
    KeyholderCommit,
    KeyholderRequest,
    Topics,
)
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
    answers = {r.holder_id: r for r in exchange(members, request)}
    for member in members:
        result = answers[member.holder_id]
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
    exchange(members, request)  # every member commits; shares follow the commit quorum
    for pair in ((0, 1), (0, 2), (1, 2)):
        got = _decrypt(setup, request, [members[i] for i in pair])
        np.testing.assert_array_equal(got, expected)


def test_one_member_alone_cannot_decrypt(setup: dict[str, Any]) -> None:
    members = _members(setup)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    public = setup["committee"].manifest.public
    result = exchange(members, request)[0]
    share = DecryptionShare.from_bytes(result.share, public)
    with pytest.raises(InsufficientSharesError):
        combine(public, len(share.values), [share])


def test_results_are_signed_by_the_member(setup: dict[str, Any]) -> None:
    members = _members(setup)
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    result = exchange(members, request)[0]
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
    good = DecryptionShare.from_bytes(exchange(members, request)[0].share, public)
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
    assert {r.status for r in exchange(members, a)} == {"ok"}
    # the same request again (aggregator restart): the same answers
    assert {r.status for r in exchange(members, a)} == {"ok"}
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
    assert [r.status for r in exchange(members, honest)] == ["ok"] * 3


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
    assert {r.status for r in exchange(members, r1)} == {"ok"}
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
    assert {r.status for r in exchange(members, request)} == {"ok"}


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


def test_split_view_two_sums_to_two_halves_of_the_committee_decrypts_neither(
    setup: dict[str, Any],
) -> None:
    """A dishonest aggregator shows sum A to one honest member and sum B (A plus a victim)
    to the other, with the colluding third member answering both: without agreement the
    difference of the two decrypted sums is the victim's update. The commit phase needs
    ceil((N + T) / 2) = 3 commitments to the same request: neither sum gets them."""
    honest_1, honest_2, colluder = _members(setup)
    ups = [u for u, _ in setup["ups"]]
    a = _request(setup, ups[:3], request_id="a")
    b = _request(setup, ups[:4], request_id="b")
    commit_a = honest_1.handle(a)
    commit_b = honest_2.handle(b)
    assert isinstance(commit_a, KeyholderCommit) and isinstance(commit_b, KeyholderCommit)
    # the colluder commits to both (equivocation), and the aggregator forwards
    # each honest member's commitment only to "its" side
    for request, honest, other_commit in ((a, honest_1, commit_b), (b, honest_2, commit_a)):
        twin = _members(setup)[2]  # a fresh copy of the colluder: no memory of the other sum
        colluder_commit = twin.handle(request)
        assert isinstance(colluder_commit, KeyholderCommit)
        assert honest.receive_commit(colluder_commit) is None  # 2 of 3: not enough
        assert honest.receive_commit(other_commit) is None  # the other honest one: another digest
    assert honest_1.counters.get("ok") is None and honest_2.counters.get("ok") is None
    # and the colluder's two commitments reaching one honest member count once
    assert honest_1.receive_commit(colluder.handle(b)) is None  # type: ignore[arg-type]


def test_commit_quorum_is_n_plus_t_over_two(setup: dict[str, Any]) -> None:
    members = _members(setup)
    assert {m.commit_quorum for m in members} == {3}  # 2-of-3
    from aggregator.committee import commit_quorum

    # any two quorums share >= T members, and N - quorum members may be offline
    for n in range(1, 12):
        for t in range(1, n + 1):
            q = commit_quorum(n, t)
            assert 2 * q - n >= t and q <= n and (q - 1 < t or 2 * (q - 1) - n < t)
    assert [commit_quorum(n, t) for n, t in ((3, 2), (4, 2), (5, 3), (1, 1))] == [3, 3, 4, 1]
    request = _request(setup, [u for u, _ in setup["ups"][:3]])
    # with one member offline the 2-of-3 committee cannot release (liveness cost)
    assert exchange(members[:2], request) == []
