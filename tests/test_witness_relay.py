"""The witness relay: a member whose broker lost its copies of some updates still answers.

A clustered broker that loses a node drops sessions, so a committee member
can miss updates the aggregator received (seen in CI: a 3-node NATS cluster
losing a node, one member refused ``verify_ciphertext_missing``, the round
stalled). The member names what it lacks in a signed ``kh_gap`` notice; the
aggregator relays those devices' own signed updates; the member checks them
exactly as broker-delivered ones. The relay adds no trust in the aggregator:
a forged or re-labelled relayed update is refused like one on the broker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aggregator.keyholder_service import KeyholderService
from aggregator.rounds import (
    MAX_RELAYS,
    Rejected,
    RelayUpdates,
    RequestDecryption,
    WitnessGapReported,
)
from aggregator.service import AggregatorService
from edge_sdk.identity import DeviceIdentity
from edge_sdk.protocol import KeyholderRequest, WitnessGap
from edge_sdk.transport import MemoryBroker
from tests import test_aggregator_support as _support
from tests.test_aggregator_service import Device, _service
from tests.test_aggregator_support import FED, Fleet, deltas, make_update

keypair = _support.keypair  # session fixture
DIM = 40


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(4, tmp_path / "registry.json")


def _round_with_a_late_member(keypair, fleet: Fleet, tmp_path: Path, *, relay: bool):  # type: ignore[no-untyped-def]
    """Three remote members; the third connects only after every update went by."""
    pk, _ = keypair
    broker = MemoryBroker()
    relay_dir = tmp_path / "agg.db.relay" if relay else None
    svc = _service(keypair, fleet, broker, tmp_path, target=3, remote=True, relay_dir=relay_dir)
    members = svc._test_members  # type: ignore[attr-defined]
    services = []
    for member in members[:2]:
        transport = broker.transport(member.holder_id, max_message_size=16 * 1024)
        services.append(KeyholderService(member, transport))
        services[-1].start()
    svc.start()
    ann = svc.machine.announcement
    assert ann is not None
    updates = [
        make_update(ann, pk, fleet.identities[d], deltas(3, DIM)[i])[0]
        for i, d in enumerate(fleet.ids()[:3])
    ]
    for update in updates:
        Device(broker, fleet.identities[update.device_id]).send(update)
        svc.pump()
    late = KeyholderService(
        members[2], broker.transport(members[2].holder_id, max_message_size=16 * 1024)
    )
    late.start()  # it saw none of the three updates
    services.append(late)
    return svc, services, updates


def _re_ask(svc: AggregatorService, request: KeyholderRequest) -> None:
    """The aggregator's periodic re-ask (``keyholder_retry_ms``), now that the member is up."""
    svc._execute([RequestDecryption(request=request)])


def test_a_member_that_missed_updates_gets_them_relayed_and_the_round_completes(
    keypair, fleet: Fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    svc, services, _ = _round_with_a_late_member(keypair, fleet, tmp_path, relay=True)
    late = services[2]
    assert svc.machine.phase == "decrypting"
    request = svc.machine.pending_request
    assert request is not None and late.keyholder.missing(request) == 3
    _re_ask(svc, request)
    for _ in range(5):
        svc.pump()
    assert late.gaps_sent == 1
    assert svc.relayed == 3
    assert late.keyholder.counters.get("witness_stored") == 3
    assert svc.machine.model is not None and svc.machine.model.version == 1
    rec = svc.store.round_record(1)
    assert rec is not None and rec.outcome == "ok"
    # the kept copies of a finished round are deleted
    assert not (tmp_path / "agg.db.relay" / "1.log").exists()
    svc.close()


def test_without_the_relay_the_member_cannot_answer(keypair, fleet: Fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    svc, services, _ = _round_with_a_late_member(keypair, fleet, tmp_path, relay=False)
    request = svc.machine.pending_request
    assert request is not None
    _re_ask(svc, request)
    for _ in range(5):
        svc.pump()
    assert services[2].gaps_sent == 1 and svc.relayed == 0
    assert svc.machine.phase == "decrypting" and svc.machine.model is not None
    assert svc.machine.model.version == 0  # the commit quorum (3 of 3) is not met
    svc.close()


def test_relayed_updates_are_checked_like_broadcast_ones(
    keypair, fleet: Fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    svc, services, updates = _round_with_a_late_member(keypair, fleet, tmp_path, relay=True)
    member = services[2].keyholder
    good = updates[0]
    other = fleet.ids()[1]
    # re-labelled as another device: its signature no longer verifies
    relabelled = dataclasses.replace(good, device_id=other)
    assert member.witness_relayed(other, relabelled.to_bytes()) == "bad_signature"
    # chunks sent "from" a device other than the update's
    assert member.witness_relayed(other, good.to_bytes()) == "relay_sender"
    assert member.witness_relayed(good.device_id, b"not an update") == "relay_decode"
    # a device that is not enrolled
    stranger = DeviceIdentity.generate("dev99")
    ann = svc.machine.announcement
    assert ann is not None
    forged = make_update(ann, keypair[0], stranger, deltas(1, DIM)[0])[0]
    assert member.witness_relayed("dev99", forged.to_bytes()) == "unknown_device"
    assert member.witnessed(good.device_id, good.round_id) is None  # nothing was stored
    assert member.witness_relayed(good.device_id, good.to_bytes()) == "stored"
    assert member.witnessed(good.device_id, good.round_id) == good.ciphertext_digest
    svc.close()


def test_the_aggregator_relays_only_signed_notices_for_its_contributors(
    keypair, fleet: Fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    svc, services, updates = _round_with_a_late_member(keypair, fleet, tmp_path, relay=True)
    machine = svc.machine
    request = machine.pending_request
    assert request is not None
    member = services[2].keyholder
    gap = member.gap_notice(request)
    assert gap is not None and set(gap.devices) == {u.device_id for u in updates}
    now = 10**7

    def feed(notice: WitnessGap, at: int = now) -> list[object]:
        return list(machine.handle(WitnessGapReported(gap=notice, now_ms=at)))

    unsigned = dataclasses.replace(gap, signature=b"")
    assert [getattr(a, "reason", None) for a in feed(unsigned)] == ["witness_gap_invalid_signature"]
    impostor = DeviceIdentity.generate("keyholder-9")
    foreign = dataclasses.replace(gap, holder_id="keyholder-9")
    foreign = dataclasses.replace(foreign, signature=impostor.sign(foreign.signed_bytes()))
    assert [getattr(a, "reason", None) for a in feed(foreign)] == ["witness_gap_unknown_holder"]
    stale = dataclasses.replace(gap, request_id="another-request")
    stale = dataclasses.replace(stale, signature=member.identity.sign(stale.signed_bytes()))
    got = feed(stale)
    assert len(got) == 1 and isinstance(got[0], Rejected) and got[0].reason == "stale_witness_gap"
    # a device that did not contribute is never relayed
    listed = (*gap.devices, fleet.ids()[3])
    wider = dataclasses.replace(gap, devices=listed)
    wider = dataclasses.replace(wider, signature=member.identity.sign(wider.signed_bytes()))
    got = feed(wider)
    assert len(got) == 1 and isinstance(got[0], RelayUpdates)
    assert set(got[0].device_ids) == set(gap.devices) and got[0].holder_id == member.holder_id
    # a flood of notices costs one relay per device and retry period
    assert feed(gap, now + 1) == []
    retry = machine.config.keyholder_retry_ms
    again = feed(gap, now + retry)
    assert len(again) == 1 and isinstance(again[0], RelayUpdates)
    # and at most MAX_RELAYS times per member, device and request
    for k in range(2, MAX_RELAYS):
        assert len(feed(gap, now + k * retry)) == 1
    assert feed(gap, now + MAX_RELAYS * retry) == [] == feed(gap, now + 10 * MAX_RELAYS * retry)
    svc.close()


def test_gap_notice_names_only_what_is_missing(keypair, fleet: Fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    svc, services, updates = _round_with_a_late_member(keypair, fleet, tmp_path, relay=True)
    request = svc.machine.pending_request
    assert request is not None
    late = services[2].keyholder
    assert late.witness_relayed(updates[1].device_id, updates[1].to_bytes()) == "stored"
    gap = late.gap_notice(request)
    assert gap is not None
    assert set(gap.devices) == {updates[0].device_id, updates[2].device_id}
    assert gap.federation == FED and gap.round_id == request.round_id
    assert WitnessGap.from_bytes(gap.to_bytes()) == gap
    for update in (updates[0], updates[2]):
        assert late.witness_relayed(update.device_id, update.to_bytes()) == "stored"
    assert late.gap_notice(request) is None  # nothing missing: no notice
    svc.close()


def test_relay_log_survives_a_restart_and_cuts_a_torn_record(tmp_path: Path) -> None:
    from aggregator.relay_log import RelayLog

    folder = tmp_path / "relay"
    first = RelayLog(folder)
    first.keep(3, "dev-a", b"A" * 100)
    first.keep(3, "dev-b", b"B" * 50)
    first.flush()
    first.close()
    with (folder / "3.log").open("ab") as f:  # a record torn by a crash mid-write
        f.write(b"\x00\x05dev-c\x00\x00\x01\x00" + b"C" * 10)
    again = RelayLog(folder)
    assert again.get(3, "dev-a") == b"A" * 100 and again.get(3, "dev-b") == b"B" * 50
    assert again.get(3, "dev-c") is None
    again.keep(3, "dev-d", b"D" * 7)  # appended after the cut, readable
    assert again.get(3, "dev-d") == b"D" * 7 and again.get(3, "dev-a") == b"A" * 100
    assert again.get(4, "dev-a") is None
    again.keep(4, "dev-a", b"next")
    again.drop_before(4)
    assert not (folder / "3.log").exists() and again.get(4, "dev-a") == b"next"
    again.close()
