"""The device session: a state machine without I/O.

Events go in (:meth:`DeviceSession.handle`), actions come out; the driver
(:mod:`edge_sdk.agent.runner`) executes actions against MQTT, the disk and
the trainer, and feeds results back as events. Tests drive the same class
directly against a scripted peer.

Rules (the "why" of each branch):

1. A round is taken at most once. An announcement whose round id is not
   newer than the last one handled is stale (a replayed retained message)
   and ignored.
2. A round whose deadline has passed, that names another model version than
   the one this device holds and cannot get, or that does not include this
   device, is skipped and the reason goes to the status topic.
3. The update is prepared by the driver (train, privatize, charge the
   ledger, seal, store in the outbox) and only then published; after a
   reboot the stored envelope is resent byte for byte, never re-noised.
4. The envelope stays in the outbox until a receipt for exactly that update
   arrives; it is resent on every (re)connect and, with exponential backoff,
   while no receipt comes. A newer round announcement supersedes it (the
   aggregator only announces r + 1 after closing r).
5. A global model is applied only when its version is newer than the one
   held; its digest chain is checked on construction of the message.
6. A device waiting for the model a round names asks the driver to fetch it
   again (:class:`FetchModel`) after ``model_fetch_ms`` and then with a
   doubling wait: a broker can lose a subscription (a cluster that lost a
   node) or serve retained messages only to exact topics (RabbitMQ), and
   the retained model would otherwise never come.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edge_sdk.protocol import GlobalModel, Receipt, RoundAnnouncement

__all__ = [
    "Action",
    "ApplyModel",
    "ClearOutbox",
    "Connected",
    "DeviceSession",
    "Disconnected",
    "Event",
    "FetchModel",
    "ModelReceived",
    "OutboxEntry",
    "Phase",
    "PrepareUpdate",
    "PublishStatus",
    "PublishUpdate",
    "ReceiptReceived",
    "RoundReceived",
    "Started",
    "Tick",
    "UpdateFailed",
    "UpdateReady",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxEntry:
    """A sealed update waiting for its receipt.

    Attributes:
        round_id: the round it answers.
        update_digest: its identity (what the receipt names).
        payload: the encoded EncryptedUpdate, byte for byte as first sent.
    """

    round_id: int
    update_digest: bytes
    payload: bytes


# ----------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """The agent (re)started with what it found on disk."""

    now_ms: int
    model_version: int | None
    outbox: OutboxEntry | None = None
    last_round: int = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected:
    """The transport (re)connected."""

    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnected:
    """The transport lost its connection."""

    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundReceived:
    """A round announcement arrived."""

    now_ms: int
    announcement: RoundAnnouncement


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelReceived:
    """A complete global model arrived."""

    now_ms: int
    model: GlobalModel


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptReceived:
    """A receipt arrived on this device's ack topic."""

    now_ms: int
    receipt: Receipt


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateReady:
    """The driver prepared and durably stored the update for a round."""

    now_ms: int
    entry: OutboxEntry


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateFailed:
    """The driver could not (or must not) prepare an update for a round."""

    now_ms: int
    round_id: int
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Time passed (drives resends)."""

    now_ms: int


Event = (
    Started
    | Connected
    | Disconnected
    | RoundReceived
    | ModelReceived
    | ReceiptReceived
    | UpdateReady
    | UpdateFailed
    | Tick
)


# ---------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareUpdate:
    """Train, privatize, charge the ledger, seal and store; then report UpdateReady."""

    announcement: RoundAnnouncement


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishUpdate:
    """Publish (or resend) the stored envelope, chunked."""

    entry: OutboxEntry
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearOutbox:
    """The receipt came: delete the stored envelope."""

    round_id: int
    status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyModel:
    """Adopt a newer global model (and persist it)."""

    model: GlobalModel


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishStatus:
    """Tell the aggregator what this device is doing."""

    state: str
    round_id: int = -1
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchModel:
    """Ask the broker for the retained model again (re-subscribe, exact topics too)."""

    version: int
    attempt: int


Action = PrepareUpdate | PublishUpdate | ClearOutbox | ApplyModel | PublishStatus | FetchModel


class Phase(enum.Enum):
    """Where the session is."""

    IDLE = "idle"
    WAITING_FOR_MODEL = "waiting_for_model"
    PREPARING = "preparing"
    AWAITING_RECEIPT = "awaiting_receipt"


@dataclass(slots=True)
class _State:
    phase: Phase = Phase.IDLE
    model_version: int | None = None
    last_round: int = -1
    pending_round: RoundAnnouncement | None = None
    outbox: OutboxEntry | None = None
    attempts: int = 0
    next_resend_ms: int = 0
    fetch_attempts: int = 0
    next_fetch_ms: int = 0
    connected: bool = False
    counters: dict[str, int] = field(default_factory=dict)


class DeviceSession:
    """The device's protocol logic (no I/O).

    Args:
        device_id: this device.
        federation: its federation.
        resend_initial_ms: first wait for a receipt before resending.
        resend_max_ms: cap of the exponential resend backoff.
        model_fetch_ms: how long to wait for a round's model before asking
            for it again (then doubling, capped at ``resend_max_ms``).
    """

    def __init__(
        self,
        *,
        device_id: str,
        federation: str,
        resend_initial_ms: int = 15_000,
        resend_max_ms: int = 300_000,
        model_fetch_ms: int = 10_000,
    ) -> None:
        if resend_initial_ms <= 0 or resend_max_ms < resend_initial_ms:
            raise ValueError(
                f"need 0 < resend_initial_ms <= resend_max_ms, got {resend_initial_ms}, "
                f"{resend_max_ms}"
            )
        self.device_id = device_id
        self.federation = federation
        self.resend_initial_ms = resend_initial_ms
        self.resend_max_ms = resend_max_ms
        if model_fetch_ms <= 0:
            raise ValueError(f"model_fetch_ms must be > 0, got {model_fetch_ms}")
        self.model_fetch_ms = model_fetch_ms
        self._s = _State()

    # ------------------------------------------------------------- inspection
    @property
    def phase(self) -> Phase:
        """Current phase."""
        return self._s.phase

    @property
    def model_version(self) -> int | None:
        """Version of the global model held, if any."""
        return self._s.model_version

    @property
    def outbox(self) -> OutboxEntry | None:
        """The update awaiting its receipt, if any."""
        return self._s.outbox

    @property
    def last_round(self) -> int:
        """The newest round id handled (taken or skipped)."""
        return self._s.last_round

    @property
    def counters(self) -> dict[str, int]:
        """Event counters (resends, skips by reason, stale messages...)."""
        return dict(self._s.counters)

    def _count(self, key: str) -> None:
        self._s.counters[key] = self._s.counters.get(key, 0) + 1

    # --------------------------------------------------------------- dispatch
    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to execute, in order."""
        if isinstance(event, Started):
            return self._on_started(event)
        if isinstance(event, Connected):
            self._s.connected = True
            actions: list[Action] = [PublishStatus(state="online", round_id=self._s.last_round)]
            if self._s.outbox is not None:
                actions.append(self._resend(event.now_ms))
            return actions
        if isinstance(event, Disconnected):
            self._s.connected = False
            return []
        if isinstance(event, RoundReceived):
            return self._on_round(event.announcement, event.now_ms)
        if isinstance(event, ModelReceived):
            return self._on_model(event.model, event.now_ms)
        if isinstance(event, ReceiptReceived):
            return self._on_receipt(event.receipt)
        if isinstance(event, UpdateReady):
            return self._on_ready(event.entry, event.now_ms)
        if isinstance(event, UpdateFailed):
            return self._on_failed(event)
        if isinstance(event, Tick):
            return self._on_tick(event.now_ms)
        raise TypeError(f"unknown event {event!r}")

    # ---------------------------------------------------------------- handlers
    def _on_started(self, event: Started) -> list[Action]:
        s = self._s
        s.model_version = event.model_version
        s.last_round = max(event.last_round, event.outbox.round_id if event.outbox else -1)
        s.outbox = event.outbox
        s.attempts = 0
        if s.outbox is not None:
            s.phase = Phase.AWAITING_RECEIPT
            s.next_resend_ms = event.now_ms  # resend as soon as connected
        else:
            s.phase = Phase.IDLE
        return []

    def _skip(self, round_id: int, reason: str, detail: str = "") -> list[Action]:
        self._count(f"skipped_{reason}")
        self._s.last_round = max(self._s.last_round, round_id)
        if self._s.phase is not Phase.AWAITING_RECEIPT:
            self._s.phase = Phase.IDLE
        self._s.pending_round = None
        text = reason if not detail else f"{reason}: {detail}"
        return [PublishStatus(state="skipped", round_id=round_id, detail=text[:256])]

    def _on_round(self, ann: RoundAnnouncement, now_ms: int) -> list[Action]:
        s = self._s
        if ann.federation != self.federation:
            self._count("foreign_federation")
            return []
        if ann.round_id <= s.last_round:
            self._count("stale_round")
            return []
        actions: list[Action] = []
        if s.outbox is not None and s.outbox.round_id < ann.round_id:
            # The aggregator moved on: round outbox.round_id is closed.
            actions.append(ClearOutbox(round_id=s.outbox.round_id, status="superseded"))
            s.outbox = None
            s.phase = Phase.IDLE
        if s.phase is Phase.PREPARING:
            self._count("round_while_preparing")
        if not ann.in_cohort(self.device_id):
            return actions + self._skip(ann.round_id, "not_in_cohort")
        if now_ms > ann.deadline_ms:
            return actions + self._skip(ann.round_id, "deadline_passed")
        if s.model_version is None or s.model_version < ann.model_version:
            s.pending_round = ann
            s.phase = Phase.WAITING_FOR_MODEL
            s.fetch_attempts = 0
            s.next_fetch_ms = now_ms + self.model_fetch_ms
            return [
                *actions,
                PublishStatus(
                    state="waiting",
                    round_id=ann.round_id,
                    detail=f"need model v{ann.model_version}",
                ),
            ]
        if s.model_version > ann.model_version:
            return actions + self._skip(
                ann.round_id, "model_mismatch", f"round wants v{ann.model_version}"
            )
        return actions + self._begin(ann)

    def _begin(self, ann: RoundAnnouncement) -> list[Action]:
        s = self._s
        s.last_round = ann.round_id
        s.pending_round = None
        s.phase = Phase.PREPARING
        return [
            PublishStatus(state="training", round_id=ann.round_id),
            PrepareUpdate(announcement=ann),
        ]

    def _on_model(self, model: GlobalModel, now_ms: int) -> list[Action]:
        s = self._s
        if model.federation != self.federation:
            self._count("foreign_federation")
            return []
        if s.model_version is not None and model.version <= s.model_version:
            self._count("stale_model")
            return []
        s.model_version = model.version
        actions: list[Action] = [ApplyModel(model=model)]
        pending = s.pending_round
        if pending is not None and pending.model_version <= model.version:
            if pending.model_version < model.version:
                actions += self._skip(pending.round_id, "model_mismatch")
            elif now_ms > pending.deadline_ms:
                actions += self._skip(pending.round_id, "deadline_passed")
            else:
                actions += self._begin(pending)
        return actions

    def _on_ready(self, entry: OutboxEntry, now_ms: int) -> list[Action]:
        s = self._s
        if entry.round_id != s.last_round:
            self._count("ready_for_old_round")
        s.outbox = entry
        s.phase = Phase.AWAITING_RECEIPT
        s.attempts = 0
        return [PublishStatus(state="uploading", round_id=entry.round_id), self._resend(now_ms)]

    def _on_failed(self, event: UpdateFailed) -> list[Action]:
        if self._s.phase is Phase.PREPARING:
            self._s.phase = Phase.IDLE
        return self._skip(event.round_id, event.reason, event.detail)

    def _on_receipt(self, receipt: Receipt) -> list[Action]:
        s = self._s
        entry = s.outbox
        if (
            entry is None
            or receipt.device_id != self.device_id
            or receipt.round_id != entry.round_id
            or receipt.update_digest != entry.update_digest
        ):
            self._count("unmatched_receipt")
            return []
        self._count(f"receipt_{receipt.status}")
        s.outbox = None
        s.phase = Phase.IDLE
        return [
            ClearOutbox(round_id=entry.round_id, status=receipt.status),
            PublishStatus(state="waiting", round_id=entry.round_id, detail=receipt.status),
        ]

    def _on_tick(self, now_ms: int) -> list[Action]:
        s = self._s
        if s.outbox is not None and s.connected and now_ms >= s.next_resend_ms:
            self._count("resend")
            return [self._resend(now_ms)]
        pending = s.pending_round
        if (
            s.phase is Phase.WAITING_FOR_MODEL
            and pending is not None
            and s.connected
            and now_ms >= s.next_fetch_ms
        ):
            s.fetch_attempts += 1
            wait = self.model_fetch_ms * 2 ** min(s.fetch_attempts, 20)
            s.next_fetch_ms = now_ms + min(self.resend_max_ms, wait)
            self._count("model_fetch")
            return [FetchModel(version=pending.model_version, attempt=s.fetch_attempts)]
        return []

    def _resend(self, now_ms: int) -> PublishUpdate:
        s = self._s
        assert s.outbox is not None
        s.attempts += 1
        wait = min(self.resend_max_ms, self.resend_initial_ms * 2 ** min(s.attempts - 1, 20))
        s.next_resend_ms = now_ms + wait
        return PublishUpdate(entry=s.outbox, attempt=s.attempts)
