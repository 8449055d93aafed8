"""The device session state machine, driven directly (no I/O)."""

from __future__ import annotations

import itertools

from edge_sdk.agent.session import (
    ApplyModel,
    ClearOutbox,
    Connected,
    DeviceSession,
    ModelReceived,
    OutboxEntry,
    Phase,
    PrepareUpdate,
    PublishStatus,
    PublishUpdate,
    ReceiptReceived,
    RoundReceived,
    Started,
    Tick,
    UpdateFailed,
    UpdateReady,
)
from edge_sdk.protocol import GlobalModel, Receipt, RoundAnnouncement, model_digest

FED = "fed"
ZERO = b"\0" * 32


def model(version: int) -> GlobalModel:
    w = b"\0\0\0\0" * 4
    return GlobalModel(
        federation=FED,
        version=version,
        round_id=version,
        parent_digest=ZERO,
        digest=model_digest(version, ZERO, w),
        num_params=4,
        weights=w,
        created_ms=0,
    )


def ann(
    round_id: int, *, version: int = 0, deadline: int = 10_000, cohort: tuple[str, ...] = ()
) -> RoundAnnouncement:
    return RoundAnnouncement(
        federation=FED,
        round_id=round_id,
        model_version=version,
        model_digest=ZERO,
        issued_ms=0,
        deadline_ms=deadline,
        cohort=cohort,
        min_clients=1,
        max_contributors=10,
        key_fingerprint=ZERO,
        packing=b"p",
        packing_digest=ZERO,
    )


def entry(round_id: int) -> OutboxEntry:
    return OutboxEntry(round_id=round_id, update_digest=bytes([round_id]) * 32, payload=b"env")


def receipt(e: OutboxEntry, status: str = "accepted", device: str = "d1") -> Receipt:
    return Receipt(
        federation=FED,
        round_id=e.round_id,
        device_id=device,
        update_digest=e.update_digest,
        status=status,
        issued_ms=0,
    )


def fresh() -> DeviceSession:
    s = DeviceSession(device_id="d1", federation=FED, resend_initial_ms=1000, resend_max_ms=8000)
    s.handle(Started(now_ms=0, model_version=None))
    s.handle(Connected(now_ms=0))
    return s


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_full_round() -> None:
    s = fresh()
    assert kinds(s.handle(ModelReceived(now_ms=1, model=model(0)))) == ["ApplyModel"]
    actions = s.handle(RoundReceived(now_ms=2, announcement=ann(1)))
    assert isinstance(actions[-1], PrepareUpdate) and s.phase is Phase.PREPARING
    e = entry(1)
    actions = s.handle(UpdateReady(now_ms=3, entry=e))
    assert isinstance(actions[-1], PublishUpdate) and actions[-1].entry == e
    actions = s.handle(ReceiptReceived(now_ms=4, receipt=receipt(e)))
    assert isinstance(actions[0], ClearOutbox) and actions[0].status == "accepted"
    assert s.phase is Phase.IDLE and s.outbox is None


def test_round_before_model_waits_then_begins() -> None:
    s = fresh()
    actions = s.handle(RoundReceived(now_ms=1, announcement=ann(1)))
    assert s.phase is Phase.WAITING_FOR_MODEL
    assert isinstance(actions[-1], PublishStatus) and actions[-1].state == "waiting"
    actions = s.handle(ModelReceived(now_ms=2, model=model(0)))
    assert kinds(actions) == ["ApplyModel", "PublishStatus", "PrepareUpdate"]


def test_reboot_mid_upload_resends_the_same_envelope() -> None:
    e = entry(3)
    s = DeviceSession(device_id="d1", federation=FED)
    s.handle(Started(now_ms=0, model_version=0, outbox=e))
    actions = s.handle(Connected(now_ms=1))
    resend = [a for a in actions if isinstance(a, PublishUpdate)]
    assert resend and resend[0].entry is e
    # the retained announcement of the same round arrives again: not re-prepared
    assert not any(
        isinstance(a, PrepareUpdate) for a in s.handle(RoundReceived(now_ms=2, announcement=ann(3)))
    )
    assert s.counters["stale_round"] == 1


def test_missed_deadline_is_skipped_and_said() -> None:
    s = fresh()
    s.handle(ModelReceived(now_ms=0, model=model(0)))
    actions = s.handle(RoundReceived(now_ms=20_000, announcement=ann(1, deadline=10_000)))
    assert kinds(actions) == ["PublishStatus"]
    assert actions[0].state == "skipped" and "deadline_passed" in actions[0].detail


def test_exhausted_budget_is_skipped_and_said() -> None:
    s = fresh()
    s.handle(ModelReceived(now_ms=0, model=model(0)))
    s.handle(RoundReceived(now_ms=1, announcement=ann(1)))
    actions = s.handle(
        UpdateFailed(now_ms=2, round_id=1, reason="budget_exhausted", detail="epsilon 8.1 > 8")
    )
    assert actions[0].state == "skipped"
    assert actions[0].detail.startswith("budget_exhausted")
    assert s.phase is Phase.IDLE and s.counters["skipped_budget_exhausted"] == 1


def test_not_in_cohort_and_stale_or_foreign_messages() -> None:
    s = fresh()
    s.handle(ModelReceived(now_ms=0, model=model(2)))
    assert s.handle(ModelReceived(now_ms=0, model=model(1))) == []  # old retained model
    actions = s.handle(RoundReceived(now_ms=1, announcement=ann(5, version=2, cohort=("x",))))
    assert "not_in_cohort" in actions[0].detail
    assert s.handle(RoundReceived(now_ms=1, announcement=ann(4, version=2))) == []
    assert s.counters["stale_model"] == 1 and s.counters["stale_round"] == 1


def test_resend_backoff_grows_and_caps() -> None:
    s = fresh()
    s.handle(ModelReceived(now_ms=0, model=model(0)))
    s.handle(RoundReceived(now_ms=0, announcement=ann(1)))
    s.handle(UpdateReady(now_ms=0, entry=entry(1)))
    sent_at = []
    for now in range(0, 40_000, 100):
        if s.handle(Tick(now_ms=now)):
            sent_at.append(now)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert sent_at[0] == 1000
    assert gaps[:3] == [2000, 4000, 8000] and max(gaps) == 8000


def test_unmatched_receipts_are_ignored() -> None:
    s = fresh()
    s.handle(ModelReceived(now_ms=0, model=model(0)))
    s.handle(RoundReceived(now_ms=0, announcement=ann(1)))
    e = entry(1)
    s.handle(UpdateReady(now_ms=0, entry=e))
    other = OutboxEntry(round_id=1, update_digest=b"\x09" * 32, payload=b"")
    assert s.handle(ReceiptReceived(now_ms=1, receipt=receipt(other))) == []
    assert s.handle(ReceiptReceived(now_ms=1, receipt=receipt(e, device="d2"))) == []
    assert s.outbox == e


def test_newer_round_supersedes_an_unanswered_update() -> None:
    s = fresh()
    s.handle(ModelReceived(now_ms=0, model=model(0)))
    s.handle(RoundReceived(now_ms=0, announcement=ann(1)))
    s.handle(UpdateReady(now_ms=0, entry=entry(1)))
    s.handle(ModelReceived(now_ms=1, model=model(1)))
    actions = s.handle(RoundReceived(now_ms=2, announcement=ann(2, version=1)))
    assert isinstance(actions[0], ClearOutbox) and actions[0].status == "superseded"
    assert isinstance(actions[-1], PrepareUpdate)


def test_apply_model_carries_the_model() -> None:
    s = fresh()
    m = model(0)
    (action,) = s.handle(ModelReceived(now_ms=0, model=m))
    assert isinstance(action, ApplyModel) and action.model is m
