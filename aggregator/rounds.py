"""The aggregator's round state machine, without I/O.

Events go in (:class:`Start`, :class:`MessageReceived`, :class:`Tick`,
:class:`KeyholderAnswered`, :class:`WitnessGapReported`), actions come out
(:class:`Commit`, :class:`PersistAccepted`, :class:`Publish`,
:class:`SendReceipt`, :class:`RequestDecryption`, :class:`RelayUpdates`,
:class:`Rejected`, :class:`Alert`). Time comes
in with every event. The service executes the actions in order: every
persist action comes before the publishes and receipts that depend on it,
and the inbound MQTT message is acknowledged only after all of them ran.

Phases of a round::

    collecting --(target reached, or deadline with >= min_clients)--> decrypting
    collecting --(deadline with < min_clients)--> failed --> next round
    decrypting --(T verified decryption shares)--> done: new model --> next round
    decrypting --(more than N - T members refused or sent bad shares,
                  or the combined sum overflows)--> failed --> next round

Rule 1: validate, then mutate. An update reaches the running sum only after
every check passed: topic, chunks, schema, federation, device registered and
not revoked, signature, round, cohort, key fingerprint, packing digest,
privacy digest, shape, ciphertext length and range. Each rejection has a
precise reason (logged and counted via :class:`Rejected`); the device's
receipt only says ``rejected``.

Rule 2: one update per device per round. The exact same update again is
acknowledged again (``duplicate``) and counted once; a different signed
update from the same device for the same round is equivocation: rejected,
and raised as an :class:`Alert` (it is a signed proof of misbehaviour).

Rule 3: the in-memory state is only ever ahead of the store by the actions
just returned. If executing them fails the service must exit; a restart
rebuilds the machine from the store (:meth:`RoundMachine.restore`) and the
broker redelivers the unacknowledged message.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import numpy as np
import numpy.typing as npt

from aggregator.committee import CommitteeVerifier, InvalidShareError
from aggregator.intake import UpdateIntake
from aggregator.optimizers import ServerOptimizer, mean_delta
from aggregator.planning import RoundPlan, build_announcement
from edge_sdk.crypto import (
    CiphertextAccumulator,
    CiphertextVector,
    DJNBase,
    PackingSpec,
    unpack_sum,
)
from edge_sdk.errors import (
    CryptoError,
    DecodeError,
    InvalidCiphertextError,
    InvalidSignatureError,
    SlotOverflowError,
)
from edge_sdk.extras import FederatedMetrics, federated_metrics
from edge_sdk.identity import DeviceIdentity, DeviceRegistry, SignedMessage, sign_message
from edge_sdk.pipeline import noise_digest, verify_update_binding
from edge_sdk.privacy import NoiseSpec
from edge_sdk.protocol import (
    ContributorProof,
    EncryptedUpdate,
    GlobalModel,
    KeyholderRequest,
    KeyholderResult,
    PartialSum,
    Receipt,
    RoundAnnouncement,
    ShardControl,
    Topics,
    WitnessGap,
    model_digest,
    split_payload,
)
from edge_sdk.protocol.limits import MAX_UPDATE_BYTES

__all__ = [
    "Action",
    "Alert",
    "Commit",
    "ControlReceived",
    "Event",
    "KeyholderAnswered",
    "MessageReceived",
    "PartialReceived",
    "PersistAccepted",
    "Publish",
    "Rejected",
    "RequestDecryption",
    "RoundConfig",
    "RoundMachine",
    "RoundRecord",
    "SendReceipt",
    "Snapshot",
    "Start",
    "Tick",
    "round_metrics",
    "round_outcome",
]

_S = TypeVar("_S", bound=SignedMessage)

log = logging.getLogger("edgefl.aggregator.rounds")

#: ``sealing`` (an aggregator root waiting for its workers' final partial
#: sums) and ``sealed`` (a worker's round once the root sealed it) occur only
#: in sharded aggregators (``aggregator.shards``).
PHASES = ("collecting", "sealing", "sealed", "decrypting", "done", "failed")

#: Bytes allowed for an update's envelope beyond its ciphertext blob (ten header
#: fields with ids of at most 64 characters, digests, signature: well under 1 KiB).
UPDATE_HEADER_BOUND = 4096


# ----------------------------------------------------------------- config


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundConfig:
    """Round settings (the packing headroom and noise live in the :class:`RoundPlan`).

    Attributes:
        federation: federation name.
        min_clients: quorum; below it at the deadline the round fails.
        target_clients: close the round as soon as this many updates are in.
        round_duration_ms: deadline = opening time + this.
        rounds: successful rounds (model versions) to run; 0 = forever.
        cohort: devices asked to take part (empty: every enrolled device).
        train: local training settings announced to devices.
        fixed_denominator: DP-FedAvg: divide the sum by this, not the count.
        max_message_size: largest MQTT payload published (model chunks).
        max_update_bytes: largest reassembled update accepted (the machine
            caps it further at the plan's update size: ciphertext blob plus
            ``UPDATE_HEADER_BOUND``).
        keyholder_retry_ms: re-send an unanswered decryption request after this.
        history_rounds: past rounds whose accepted digests are remembered
            (late duplicates are acknowledged as duplicates, not late).
    """

    federation: str
    min_clients: int
    target_clients: int
    round_duration_ms: int
    rounds: int = 0
    cohort: tuple[str, ...] = ()
    train: tuple[tuple[str, Any], ...] = ()
    fixed_denominator: int | None = None
    max_message_size: int = 128 * 1024
    max_update_bytes: int = MAX_UPDATE_BYTES
    keyholder_retry_ms: int = 30_000
    history_rounds: int = 4

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if self.target_clients < self.min_clients:
            raise ValueError(
                f"target_clients ({self.target_clients}) must be >= min_clients "
                f"({self.min_clients})"
            )
        if self.round_duration_ms < 1:
            raise ValueError(f"round_duration_ms must be >= 1, got {self.round_duration_ms}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.cohort and len(self.cohort) < self.min_clients:
            raise ValueError("the cohort is smaller than min_clients")


# ----------------------------------------------------------------- records


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRecord:
    """What the store keeps about one round (besides its accepted updates and sum).

    Attributes:
        round_id: the round.
        phase: ``collecting``, ``decrypting``, ``done`` or ``failed``.
        announcement: the encoded RoundAnnouncement.
        opened_ms: when it opened.
        closed_ms: when collection ended (0 while collecting).
        count: contributions in the sum at close.
        request: the encoded KeyholderRequest (while/after decrypting).
        result: the encoded KeyholderResult (after it came).
        outcome: ``ok`` or the failure reason.
    """

    round_id: int
    phase: str
    announcement: bytes
    opened_ms: int
    closed_ms: int = 0
    count: int = 0
    request: bytes = b""
    result: bytes = b""
    outcome: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The durable state the machine resumes from (see ``aggregator.store``).

    Attributes:
        current: the latest round's record.
        sum_blob: its running encrypted sum (empty when no update yet).
        count: updates in that sum.
        accepted: encoded ContributorProofs of its accepted updates.
        model: the latest global model.
        optimizer_state: the optimizer state that produced it.
        history: recent rounds' accepted (device id -> update digest).
    """

    current: RoundRecord
    sum_blob: bytes
    count: int
    accepted: tuple[bytes, ...]
    model: GlobalModel
    optimizer_state: bytes
    history: dict[int, dict[str, bytes]] = field(default_factory=dict)


# ----------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """The service (re)started or reconnected: resume and re-publish retained state."""

    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived:
    """An MQTT message on an ``updates/{device}`` topic (one chunk)."""

    topic: str
    payload: bytes
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """Time passed (deadlines, key holder retries)."""

    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyholderAnswered:
    """The key holder's result arrived."""

    result: KeyholderResult
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WitnessGapReported:
    """A committee member says it never saw some contributors' updates."""

    gap: WitnessGap
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlReceived:
    """A sharded aggregator's worker saw its root's (retained) control message."""

    control: ShardControl
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialReceived:
    """A sharded aggregator's root got a worker's partial sum (reassembled)."""

    partial: PartialSum
    now_ms: int


Event = (
    Start
    | MessageReceived
    | Tick
    | KeyholderAnswered
    | WitnessGapReported
    | ControlReceived
    | PartialReceived
)


# ----------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """Publish ``payload`` on ``topic`` (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SendReceipt:
    """Send ``receipt`` to its device's ``ack`` topic."""

    topic: str
    receipt: Receipt


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistAccepted:
    """Durably record one accepted update AND the new running sum, in one transaction."""

    round_id: int
    device_id: str
    update_digest: bytes
    proof: bytes
    sum_blob: bytes
    count: int
    at_ms: int
    update: bytes = b""  # the device's signed update as received (kept for the witness relay)


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """Durably record round transitions (and a new model), in one transaction.

    ``records`` are upserted; the last one is the current round. A new round
    starts with an empty sum.
    """

    records: tuple[RoundRecord, ...]
    model: GlobalModel | None = None
    optimizer_state: bytes | None = None
    #: accepted rows written in the same transaction, the last one's sum kept
    #: (a sharded root's combined sum, made durable with its close)
    accepted: tuple[PersistAccepted, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestDecryption:
    """Ask the key holder to decrypt ``request`` (idempotent: may be sent again)."""

    request: KeyholderRequest


# A contributor's update is relayed to one member at most this many times per
# request (a lost relay is sent again after keyholder_retry_ms).
MAX_RELAYS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayUpdates:
    """Send these contributors' own signed updates to a member that never saw them.

    The member checks them as it checks the broker's copies (device
    signature, binding): relaying gives the aggregator no say in what the
    member decrypts. At most once per member and device per
    ``keyholder_retry_ms``, and :data:`MAX_RELAYS` times per request.
    """

    holder_id: str
    round_id: int
    device_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """An inbound message was refused; ``reason`` is precise (logs and metrics only)."""

    device_id: str | None
    round_id: int | None
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """Something an operator must look at (equivocation, overflow, refused sum)."""

    kind: str
    round_id: int
    device_id: str | None = None
    detail: str = ""


Action = (
    Publish
    | SendReceipt
    | PersistAccepted
    | Commit
    | RequestDecryption
    | RelayUpdates
    | Rejected
    | Alert
)


# ----------------------------------------------------------------- machine


class RoundMachine:
    """Runs rounds: validates updates, sums them, closes, applies the result.

    Args:
        config: round settings.
        plan: packing spec, noise spec, dimension, quorum (``aggregator.planning``).
        registry: enrolled devices (signatures are checked against it).
        optimizer: the server optimizer (its state is restored from snapshots).
        initial_weights: version-0 model weights, used on the very first start.
        committee: the key-holder committee's verifier (checks each member's
            signed result and share proof, combines ``T`` shares).
        identity: the aggregator's Ed25519 identity; when given, every
            announcement, model and receipt is signed.
        binding: the committee's DJN base (from the federation policy): every
            update must carry a valid binding proof, checked before it is
            summed (the members check it too; this only keeps one bad update
            from failing a whole round).
    """

    def __init__(
        self,
        config: RoundConfig,
        plan: RoundPlan,
        registry: DeviceRegistry,
        optimizer: ServerOptimizer,
        *,
        initial_weights: npt.ArrayLike | None = None,
        committee: CommitteeVerifier,
        identity: DeviceIdentity | None = None,
        binding: DJNBase | None = None,
    ) -> None:
        """Create the machine; call :meth:`restore` (or nothing) then feed :class:`Start`."""
        if config.min_clients != plan.min_clients:
            raise ValueError("config.min_clients and plan.min_clients differ")
        if config.target_clients > plan.max_contributors:
            raise ValueError("target_clients exceeds the packing headroom (max_contributors)")
        self.config = config
        self.plan = plan
        self.registry = registry
        self.optimizer = optimizer
        self.committee = committee
        self.binding = binding
        # Signs announcements, models and receipts (devices that pin its
        # public key refuse unsigned or forged ones). Ed25519 is
        # deterministic, so a restarted machine re-signs to the same bytes.
        self.identity = identity
        self.topics = Topics(config.federation)
        self.public_key = plan.public_key
        self._fingerprint = bytes.fromhex(plan.public_key.fingerprint)
        # Adaptive clipping: the clip of the current round and the plans
        # (scale, packing, recalibrated noise) made for each clip so far.
        self._clip = plan.clip if plan.adaptive is None else plan.adaptive.initial_clip
        self._plans: dict[float, RoundPlan] = {plan.clip: plan}
        self._set_layout(plan.packing, plan.privacy_digest)
        self._initial = (
            None
            if initial_weights is None
            else np.asarray(initial_weights, dtype=np.float32).reshape(-1)
        )
        if self._initial is not None and self._initial.size != plan.dimension:
            raise ValueError(
                f"initial weights have {self._initial.size} values, the plan {plan.dimension}"
            )
        # An update of this plan is its fixed-size ciphertext blob plus a small
        # signed header: refuse a chunk declaring more before buffering any of it,
        # so a device cannot make the aggregator hold up to max_update_bytes per
        # pending payload (the Reassembler keeps up to 1,024 of them).
        expected = plan.max_ciphertexts * plan.public_key.ciphertext_bytes + UPDATE_HEADER_BOUND
        self.intake = UpdateIntake(
            config.federation, max_update_bytes=min(config.max_update_bytes, expected)
        )
        self.stats: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.finished = False
        #: Figures from the last round's decrypted extra slots (federated evaluation).
        self.last_metrics: FederatedMetrics | None = None
        self._snapshot: Snapshot | None = None
        self._record: RoundRecord | None = None
        self._announcement: RoundAnnouncement | None = None
        self._model: GlobalModel | None = None
        self._acc = CiphertextAccumulator(self.public_key, self._num_ct)
        self._accepted: dict[str, ContributorProof] = {}
        self._history: dict[int, dict[str, bytes]] = {}
        self._request: KeyholderRequest | None = None
        self._previous_request_id: str | None = None
        self._last_request_ms = 0
        #: what announcements say in ``shards`` (a sharded root announces its workers)
        self.announce_shards = 1
        self._reset_shares()

    def _plan_for(self, clip: float) -> RoundPlan:
        plan = self._plans.get(clip)
        if plan is None:
            plan = self.plan.for_clip(clip)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[clip] = plan
        return plan

    @property
    def clip(self) -> float:
        """The L2 clip the current round announces (it moves under adaptive clipping)."""
        return self._clip

    def _set_layout(self, packing: PackingSpec, privacy_digest: bytes) -> None:
        """The current round's packing (model slots, then its extra slots) and noise."""
        self._privacy_digest = privacy_digest
        self._packing = packing
        self._packing_digest = packing.digest()
        self._length = self.plan.length(packing)
        self._num_ct = packing.num_plaintexts(self._length)

    # -- state accessors ---------------------------------------------------

    @property
    def round_id(self) -> int:
        """The current round (0 before :class:`Start`)."""
        return 0 if self._record is None else self._record.round_id

    @property
    def phase(self) -> str:
        """The current round's phase (``finished`` after the last round)."""
        if self.finished:
            return "finished"
        return "" if self._record is None else self._record.phase

    @property
    def model(self) -> GlobalModel | None:
        """The latest global model."""
        return self._model

    @property
    def announcement(self) -> RoundAnnouncement | None:
        """The current round's announcement."""
        return self._announcement

    @property
    def count(self) -> int:
        """Updates accepted in the current round."""
        return self._acc.count

    @property
    def contributors(self) -> list[str]:
        """Device ids accepted in the current round, sorted."""
        return sorted(self._accepted)

    @property
    def encrypted_sum(self) -> bytes:
        """The current running sum blob."""
        return self._acc.value.to_bytes()

    # -- restore -----------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Load durable state (before :class:`Start`).

        Raises:
            ValueError: the stored model has another dimension than the plan.
            OptimizerStateError: the optimizer state stored with the model is
                another optimizer's, corrupt, or for another dimension.
        """
        if snapshot.model.num_params != self.plan.dimension:
            raise ValueError(
                f"the stored model has {snapshot.model.num_params} parameters, the plan "
                f"{self.plan.dimension}: the store belongs to another model"
            )
        # The state stored with this model, checked before anything changes
        # (load_state validates the whole record before it sets any of it).
        self.optimizer.load_state(snapshot.optimizer_state, dimension=self.plan.dimension)
        self._snapshot = snapshot
        rec = snapshot.current
        self._record = rec
        self._announcement = RoundAnnouncement.from_bytes(rec.announcement)
        ann = self._announcement
        self._set_layout(PackingSpec.from_bytes(ann.packing), noise_digest(ann.privacy))
        self._clip = _announced_clip(ann, self.plan.clip)
        self._model = snapshot.model
        if snapshot.count:
            vector = CiphertextVector.from_bytes(snapshot.sum_blob, self.public_key, self._num_ct)
            self._acc = CiphertextAccumulator.from_vector(vector, snapshot.count)
        else:
            self._acc = CiphertextAccumulator(self.public_key, self._num_ct)
        self._accepted = {}
        for blob in snapshot.accepted:
            proof = ContributorProof.from_bytes(blob)
            self._accepted[proof.device_id] = proof
        if len(self._accepted) != snapshot.count:
            raise ValueError(
                f"store is inconsistent: {len(self._accepted)} accepted rows, sum of "
                f"{snapshot.count}"
            )
        self._history = {r: dict(d) for r, d in snapshot.history.items()}
        self._history.setdefault(rec.round_id, {}).update(
            {d: p.update_digest for d, p in self._accepted.items()}
        )
        self._request = KeyholderRequest.from_bytes(rec.request) if rec.request else None
        self._reset_shares()
        done_rounds = self._model.version
        self.finished = (
            rec.phase in ("done", "failed")
            and self.config.rounds > 0
            and done_rounds >= self.config.rounds
        )

    # -- dispatch ----------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to execute, in order."""
        if isinstance(event, Start):
            return self._on_start(event.now_ms)
        if self._record is None:
            raise RuntimeError("feed Start before any other event")
        if isinstance(event, MessageReceived):
            return self._on_message(event)
        if isinstance(event, Tick):
            return self._on_tick(event.now_ms)
        if isinstance(event, KeyholderAnswered):
            return self._on_result(event.result, event.now_ms)
        if isinstance(event, WitnessGapReported):
            return self._on_gap(event.gap, event.now_ms)
        raise TypeError(f"unknown event {event!r}")

    # -- start -------------------------------------------------------------

    def _on_start(self, now: int) -> list[Action]:
        actions: list[Action] = []
        if self._record is None:
            if self._initial is None:
                raise ValueError("first start needs initial_weights")
            # A new model starts a fresh optimizer: momentum or moments left in
            # the object from another run would otherwise step the new model.
            self.optimizer.load_state(b"")
            model = self._initial_model(now)
            self._model = model
            record = self._open(1, now)
            actions.append(
                Commit(records=(record,), model=model, optimizer_state=self.optimizer.state_bytes())
            )
        actions += self._publish_model()
        actions += self._publish_round()
        if self.phase == "decrypting" and self._request is not None:
            self._last_request_ms = now
            actions.append(RequestDecryption(request=self._request))
        return actions

    def _initial_model(self, now: int) -> GlobalModel:
        """Version 0: the configured initial weights (needs ``initial_weights``)."""
        assert self._initial is not None
        weights = self._initial.astype("<f4").tobytes()
        parent = bytes(32)
        return self._sign(
            GlobalModel(
                federation=self.config.federation,
                version=0,
                round_id=0,
                parent_digest=parent,
                digest=model_digest(0, parent, weights),
                num_params=self.plan.dimension,
                weights=weights,
                created_ms=now,
            )
        )

    def _sign(self, message: _S) -> _S:
        return message if self.identity is None else sign_message(message, self.identity)

    def _open(self, round_id: int, now: int) -> RoundRecord:
        assert self._model is not None
        plan = self._plan_for(self._clip)
        ann = self._sign(
            build_announcement(
                plan,
                federation=self.config.federation,
                round_id=round_id,
                model=self._model,
                issued_ms=now,
                deadline_ms=now + self.config.round_duration_ms,
                cohort=self.config.cohort,
                train=self.config.train,
                shards=self.announce_shards,
            )
        )
        record = RoundRecord(
            round_id=round_id, phase="collecting", announcement=ann.to_bytes(), opened_ms=now
        )
        self._record = record
        self._announcement = ann
        self._set_layout(plan.packing_for(round_id), plan.privacy_digest)
        self._acc = CiphertextAccumulator(self.public_key, self._num_ct)
        self._accepted = {}
        if self._request is not None:  # late shares for it are expected, not suspicious
            self._previous_request_id = self._request.request_id
        self._request = None
        self._reset_shares()
        self._history[round_id] = {}
        for old in sorted(self._history)[: -self.config.history_rounds]:
            del self._history[old]
        self.intake.discard()
        return record

    def _publish_model(self) -> list[Action]:
        assert self._model is not None
        chunks = split_payload(
            self._model.to_bytes(),
            federation=self.config.federation,
            stream="model",
            sender="aggregator",
            round_id=self._model.version,
            max_message_size=self.config.max_message_size,
        )
        return [
            Publish(topic=self.topics.model(c.index), payload=c.to_bytes(), retain=True)
            for c in chunks
        ]

    def _publish_round(self) -> list[Action]:
        assert self._announcement is not None
        return [
            Publish(topic=self.topics.round, payload=self._announcement.to_bytes(), retain=True)
        ]

    # -- updates -----------------------------------------------------------

    def _reject(
        self,
        device_id: str | None,
        round_id: int | None,
        reason: str,
        detail: str = "",
        update: EncryptedUpdate | None = None,
        now: int = 0,
    ) -> list[Action]:
        self.rejections[reason] += 1
        self.stats["rejected"] += 1
        actions: list[Action] = [
            Rejected(device_id=device_id, round_id=round_id, reason=reason, detail=detail)
        ]
        if update is not None and device_id is not None:
            actions.append(self._receipt(device_id, update, "rejected", now))
        return actions

    def _receipt(
        self, device_id: str, update: EncryptedUpdate, status: str, now: int
    ) -> SendReceipt:
        receipt = self._sign(
            Receipt(
                federation=self.config.federation,
                round_id=update.round_id,
                device_id=device_id,
                update_digest=update.update_digest,
                status=status,
                issued_ms=now,
            )
        )
        return SendReceipt(topic=self.topics.ack(device_id), receipt=receipt)

    def _on_message(self, event: MessageReceived) -> list[Action]:
        got = self.intake.add(event.topic, event.payload)
        if got.reason == "partial":
            return []
        if got.reason:  # (a replayed update of another device comes with its update)
            return self._reject(
                got.device, got.round_id, got.reason, got.detail, got.update, event.now_ms
            )
        assert got.device is not None and got.update is not None
        return self._on_update(got.device, got.update, event.now_ms, got.payload)

    def _on_update(
        self, device: str, update: EncryptedUpdate, now: int, payload: bytes = b""
    ) -> list[Action]:
        r = update.round_id
        if update.federation != self.config.federation:
            return self._reject(device, r, "federation", update.federation, update, now)
        try:
            self.registry.verify(device, update.signing_bytes(), update.signature)
        except InvalidSignatureError as exc:
            known = ("unknown_device", "revoked", "not_approved")
            reason = exc.reason if exc.reason in known else "bad_signature"
            return self._reject(device, r, reason, "", update, now)
        digest = update.update_digest
        current = self.round_id
        if r > current:
            return self._ahead(device, update, now)
        seen = self._history.get(r, {}).get(device)
        if seen is not None:
            if seen == digest:
                self.stats["duplicate"] += 1
                return [self._receipt(device, update, "duplicate", now)]
            return [
                *self._reject(device, r, "equivocation", "", update, now),
                Alert(
                    kind="equivocation",
                    round_id=r,
                    device_id=device,
                    detail=f"second update {digest.hex()[:16]} vs accepted {seen.hex()[:16]}",
                ),
            ]
        if r < current or self.phase != "collecting":
            self.stats["late"] += 1
            return [
                Rejected(device_id=device, round_id=r, reason="late"),
                self._receipt(device, update, "late", now),
            ]
        assert self._announcement is not None
        if not self._announcement.in_cohort(device):
            return self._reject(device, r, "not_in_cohort", "", update, now)
        if update.key_fingerprint != self._fingerprint:
            return self._reject(device, r, "wrong_key", "", update, now)
        if update.packing_digest != self._packing_digest:
            return self._reject(device, r, "wrong_spec", "", update, now)
        if update.privacy_digest != self._privacy_digest:
            return self._reject(device, r, "wrong_privacy", "", update, now)
        if update.num_params != self._length or update.num_ciphertexts != self._num_ct:
            detail = f"{update.num_params} params / {update.num_ciphertexts} ciphertexts"
            return self._reject(device, r, "wrong_shape", detail, update, now)
        if self._acc.count >= self._capacity():
            return self._reject(device, r, "round_full", "", update, now)
        try:
            vector = CiphertextVector.from_bytes(update.ciphertexts, self.public_key, self._num_ct)
        except InvalidCiphertextError as exc:
            return self._reject(device, r, f"ciphertext_{exc.reason}", str(exc), update, now)
        if self.binding is not None:
            try:
                verify_update_binding(update, self.public_key, self.binding)
            except CryptoError as exc:
                return self._reject(device, r, "bad_binding", exc.reason or "", update, now)
        # Every check passed: mutate.
        self._acc.add(vector)
        proof = update.proof()
        self._accepted[device] = proof
        self._history.setdefault(r, {})[device] = digest
        self.stats["accepted"] += 1
        actions: list[Action] = [
            PersistAccepted(
                round_id=r,
                device_id=device,
                update_digest=digest,
                proof=proof.to_bytes(),
                sum_blob=self._acc.value.to_bytes(),
                count=self._acc.count,
                at_ms=now,
                update=payload,
            ),
            self._receipt(device, update, "accepted", now),
        ]
        return actions + self._after_accept(now)

    def _ahead(self, device: str, update: EncryptedUpdate, now: int) -> list[Action]:
        """An update for a round after the current one: refused (no such round yet)."""
        detail = f"current {self.round_id}"
        return self._reject(device, update.round_id, "wrong_round", detail, update, now)

    def _capacity(self) -> int:
        """Most updates this machine's sum may hold (the packing's headroom)."""
        return self.plan.max_contributors

    def _after_accept(self, now: int) -> list[Action]:
        """Close once the target is reached (a worker leaves that to its root)."""
        if self._acc.count >= self.config.target_clients:
            return self._close(now)
        return []

    # -- closing -----------------------------------------------------------

    def _close(self, now: int) -> list[Action]:
        assert self._record is not None
        count = self._acc.count
        proofs = tuple(self._accepted[d] for d in sorted(self._accepted))
        request = KeyholderRequest(
            federation=self.config.federation,
            round_id=self._record.round_id,
            request_id=f"r{self._record.round_id}-n{count}",
            packing=self._packing.to_bytes(),
            packing_digest=self._packing_digest,
            privacy=self._announcement.privacy if self._announcement else b"",
            contributors=KeyholderRequest.pack_proofs(proofs),
            encrypted_sum=self._acc.value.to_bytes(),
            issued_ms=now,
        )
        record = dataclasses.replace(
            self._record, phase="decrypting", closed_ms=now, count=count, request=request.to_bytes()
        )
        self._record = record
        self._request = request
        self._last_request_ms = now
        log.info("round %d closed with %d contributions", record.round_id, count)
        return [Commit(records=(record,)), RequestDecryption(request=request)]

    def _fail(self, reason: str, now: int, result: bytes = b"") -> list[Action]:
        assert self._record is not None
        failed = dataclasses.replace(
            self._record,
            phase="failed",
            closed_ms=self._record.closed_ms or now,
            count=self._acc.count,
            result=result,
            outcome=reason,
        )
        self.stats["rounds_failed"] += 1
        self.stats[f"rounds_failed_{reason.split(':')[0]}"] += 1
        log.warning("round %d failed: %s", failed.round_id, reason)
        nxt = self._open(failed.round_id + 1, now)
        return [Commit(records=(failed, nxt)), *self._publish_round()]

    def _on_tick(self, now: int) -> list[Action]:
        if self.finished or self._record is None:
            return []
        if self.phase == "collecting" and self._acc.count >= self.config.target_clients:
            # restored after a crash between the last accept and the close
            return self._close(now)
        if self.phase == "collecting" and now >= self._record_deadline():
            if self._acc.count >= self.config.min_clients:
                return self._close(now)
            return self._fail("quorum", now)
        if (
            self.phase == "decrypting"
            and self._request is not None
            and now - self._last_request_ms >= self.config.keyholder_retry_ms
        ):
            self._last_request_ms = now
            return [RequestDecryption(request=self._request)]
        return []

    def _record_deadline(self) -> int:
        assert self._announcement is not None
        return self._announcement.deadline_ms

    def _reset_shares(self) -> None:
        self._shares: dict[str, Any] = {}
        self._share_results: dict[str, bytes] = {}
        self._refused: dict[str, str] = {}
        self._sum_values: tuple[int, ...] | None = None
        self._relayed: dict[tuple[str, str], tuple[int, int]] = {}  # -> (last ms, times)

    def _on_result(self, result: KeyholderResult, now: int) -> list[Action]:
        request = self._request
        if (
            self.phase != "decrypting"
            or request is None
            or result.round_id != request.round_id
            or result.request_id != request.request_id
            or result.federation != self.config.federation
        ):
            done_ids = {self._previous_request_id, request.request_id if request else None}
            if result.request_id in done_ids and result.federation == self.config.federation:
                return []  # a member beyond the first T answering the last round: expected
            return [
                Rejected(device_id=None, round_id=result.round_id, reason="stale_keyholder_result")
            ]
        holder = result.holder_id
        if holder in self._shares or holder in self._refused:
            return []  # a re-sent answer (the holder saw a re-ask)
        if self._sum_values is None:
            self._sum_values = CiphertextVector.from_bytes(
                request.encrypted_sum, self.public_key, self._num_ct
            ).values
        try:
            share = self.committee.check(request, self._sum_values, result)
        except InvalidSignatureError:
            return [
                Rejected(device_id=None, round_id=result.round_id, reason="keyholder_signature"),
                Alert(kind="keyholder_signature", round_id=result.round_id, detail=holder),
            ]
        except InvalidShareError as exc:
            # A signed, wrong share: the member is misbehaving (or broken). It is
            # named, its share ignored; the others' shares still decrypt.
            self._refused[holder] = "bad_share"
            self.stats["keyholder_bad_share"] += 1
            actions: list[Action] = [
                Alert(
                    kind="keyholder_bad_share",
                    round_id=result.round_id,
                    detail=f"{holder}: {exc}",
                )
            ]
            return actions + self._maybe_give_up(now)
        if share is None:
            self._refused[holder] = result.reason
            self.stats["keyholder_refused"] += 1
            log.warning("round %d: %s refused: %s", result.round_id, holder, result.reason)
            return [
                Alert(
                    kind="keyholder_refused",
                    round_id=result.round_id,
                    detail=f"{holder}: {result.reason}",
                ),
                *self._maybe_give_up(now),
            ]
        if result.count != self._acc.count:
            self._refused[holder] = "count"
            return [
                Alert(kind="bad_keyholder_result", round_id=result.round_id, detail=holder),
                *self._maybe_give_up(now),
            ]
        self._shares[holder] = share
        self._share_results[holder] = result.to_bytes()
        if len(self._shares) < self.committee.manifest.threshold:
            return []
        return self._decrypted(now)

    @property
    def pending_request(self) -> KeyholderRequest | None:
        """The decryption request of the round being decrypted (None otherwise)."""
        return self._request if self.phase == "decrypting" else None

    def _on_gap(self, gap: WitnessGap, now: int) -> list[Action]:
        request = self._request
        if (
            self.phase != "decrypting"
            or request is None
            or gap.federation != self.config.federation
            or gap.round_id != request.round_id
            or gap.request_id != request.request_id
        ):
            return [Rejected(device_id=None, round_id=gap.round_id, reason="stale_witness_gap")]
        try:
            self.committee.check_gap(gap)
        except InvalidSignatureError as exc:
            return [
                Rejected(device_id=None, round_id=gap.round_id, reason=f"witness_gap_{exc.reason}")
            ]
        holder = gap.holder_id
        if holder in self._shares or holder in self._refused:
            return []  # it answered already
        return self._relay_due(gap, now)

    def _relay_due(self, gap: WitnessGap, now: int) -> list[Action]:
        """Relay the gap's devices that are ours, each at most once per retry and MAX_RELAYS."""
        holder = gap.holder_id
        due: list[str] = []
        for device in gap.devices:
            if device not in self._accepted:
                continue  # not a contributor: nothing of ours to relay
            last, times = self._relayed.get((holder, device), (None, 0))
            if times >= MAX_RELAYS or (
                last is not None and now - last < self.config.keyholder_retry_ms
            ):
                continue  # a flood of notices costs one relay per retry, at most MAX_RELAYS
            self._relayed[(holder, device)] = (now, times + 1)
            due.append(device)
        if not due:
            return []
        self.stats["relayed"] += len(due)
        log.info("round %d: relaying %d updates to %s", gap.round_id, len(due), holder)
        return [RelayUpdates(holder_id=holder, round_id=gap.round_id, device_ids=tuple(due))]

    def _maybe_give_up(self, now: int) -> list[Action]:
        """Fail the round once fewer than ``T`` members can still answer ok."""
        manifest = self.committee.manifest
        if manifest.size - len(self._refused) >= manifest.threshold:
            return []
        reasons = sorted(set(self._refused.values()))
        blob = _pack_results(self._share_results)
        return self._fail(f"refused:{','.join(reasons)}"[:200], now, blob)

    def _decrypted(self, now: int) -> list[Action]:
        count = self._acc.count
        blob = _pack_results(self._share_results)
        round_id = self.round_id
        plaintexts = self.committee.combine(self._num_ct, list(self._shares.values()))
        try:
            ints = unpack_sum(plaintexts, self._packing, count=count, length=self._length)
        except SlotOverflowError as exc:
            # A contributor encrypted values outside the honest range; the
            # round is discarded, never published.
            log.warning("round %d: %d slot sums out of range", round_id, len(exc.slots))
            return [
                Alert(
                    kind="keyholder_overflow", round_id=round_id, detail=f"{len(exc.slots)} slots"
                ),
                *self._fail("overflow", now, blob),
            ]
        finally:
            del plaintexts
        assert self._model is not None and self._record is not None
        blob = _pack_results(self._share_results, np.ascontiguousarray(ints, "<i8").tobytes())
        if self._packing.extras:
            metrics = federated_metrics(ints[self.plan.dimension :], self._packing, count=count)
            self.last_metrics = metrics
            log.info("round %d federated metrics: %s", round_id, metrics.to_dict())
            adaptive = self.plan.adaptive
            if adaptive is not None and metrics.clip_fraction is not None:
                # the next round's clip, from the noised fraction (post-processing)
                self._clip = adaptive.next_clip(self._clip, metrics.clip_fraction)
        delta = mean_delta(
            ints[: self.plan.dimension],
            scale=self._packing.scale,
            count=count,
            fixed_denominator=self.config.fixed_denominator,
        )
        old = np.frombuffer(self._model.weights, dtype="<f4").astype(np.float64)
        state_before = self.optimizer.state_bytes()
        new = self.optimizer.step(old, delta).astype("<f4")
        if not np.all(np.isfinite(new)):
            self.optimizer.load_state(state_before)
            return [
                Alert(kind="non_finite_model", round_id=round_id),
                *self._fail("non_finite", now, blob),
            ]
        weights = new.tobytes()
        version = self._model.version + 1
        model = self._sign(
            GlobalModel(
                federation=self.config.federation,
                version=version,
                round_id=self._record.round_id,
                parent_digest=self._model.digest,
                digest=model_digest(version, self._model.digest, weights),
                num_params=self.plan.dimension,
                weights=weights,
                created_ms=now,
            )
        )
        done = dataclasses.replace(self._record, phase="done", result=blob, outcome="ok")
        self._model = model
        self.stats["rounds_completed"] += 1
        log.info("round %d done: model version %d", done.round_id, version)
        if self.config.rounds and version >= self.config.rounds:
            self.finished = True
            self._record = done
            return [
                Commit(records=(done,), model=model, optimizer_state=self.optimizer.state_bytes()),
                *self._publish_model(),
            ]
        nxt = self._open(done.round_id + 1, now)
        return [
            Commit(records=(done, nxt), model=model, optimizer_state=self.optimizer.state_bytes()),
            *self._publish_model(),
            *self._publish_round(),
        ]


_OUTCOME_VERSION = 1


def _pack_results(results: dict[str, bytes], aggregate: bytes = b"") -> bytes:
    """A round's outcome for its record: the members' signed results and the released sum.

    The sum (int64 little-endian per parameter) is what the committee's
    shares released, kept for audit; it is empty when the round failed.
    """
    doc = {
        "v": _OUTCOME_VERSION,
        "results": [results[h] for h in sorted(results)],
        "aggregate": aggregate,
    }
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    return data


def round_outcome(blob: bytes) -> tuple[list[KeyholderResult], npt.NDArray[np.int64] | None]:
    """Decode a record's ``result``: the members' results and the released sum (or None).

    Raises:
        DecodeError: not an outcome this version wrote.
    """
    if not blob:
        return [], None
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        if not isinstance(doc, dict) or doc.get("v") != _OUTCOME_VERSION:
            raise ValueError("version")
        results = [KeyholderResult.from_bytes(r) for r in doc["results"]]
        aggregate = bytes(doc["aggregate"])
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
        raise DecodeError(f"not a round outcome: {exc}", reason="malformed") from None
    if not aggregate:
        return results, None
    return results, np.frombuffer(aggregate, dtype="<i8").copy()


def _announced_clip(ann: RoundAnnouncement, default: float) -> float:
    """The L2 clip a (restored) announcement carries: its noise spec's, or ``train``'s."""
    if ann.privacy:
        try:
            noise = NoiseSpec.from_dict(msgpack.unpackb(ann.privacy, raw=False))
        except (DecodeError, ValueError, msgpack.ExtraData):
            return default
        return noise.clip
    clip = ann.train_config().get("clip")
    return float(clip) if isinstance(clip, (int, float)) else default


def round_metrics(record: RoundRecord) -> FederatedMetrics | None:
    """The federated figures of a finished round (its extra slots), or None.

    Decoded from what the record already keeps: the announcement's packing
    spec (which extra slots, their scales) and the released sum, whose last
    values are the extra slots' noised totals.
    """
    if record.phase != "done" or not record.result:
        return None
    packing = PackingSpec.from_bytes(RoundAnnouncement.from_bytes(record.announcement).packing)
    if not packing.extras:
        return None
    aggregate = round_outcome(record.result)[1]
    if aggregate is None or aggregate.size < len(packing.extras):
        return None
    return federated_metrics(
        aggregate[aggregate.size - len(packing.extras) :], packing, count=record.count
    )
