"""A round split over aggregator workers: the root's and a worker's state machines (no I/O).

Paillier sums compose, so the devices of a round can be split over
``shards`` worker processes (``[aggregator] workers``), each owning one
shard of the devices (:func:`edge_sdk.protocol.shard_of`: a fixed function
of the device id) and keeping its own durable partial sum, while a root
owns the round: the announcement (which names ``shards``; devices then
publish on ``updates/{shard}/{device}``), the deadline, the close decision,
the committee's decryption and the model.

Both machines are :class:`~aggregator.rounds.RoundMachine` s: a worker runs
exactly the single aggregator's checks on every update (rule 1, rule 2,
its receipts, its group-committed store) plus one: the update's topic is
the device's own shard's; the root runs exactly its close, decryption and
model steps. What differs is only who decides what:

* the root opens a round and publishes, retained on ``aggregator/control``,
  a signed :class:`~edge_sdk.protocol.ShardControl` naming it; a worker
  adopts the round from it (its signed announcement) and takes its shard's
  updates;
* while collecting, a worker reports its count (a small
  :class:`~edge_sdk.protocol.PartialSum`); the root seals the round (control
  ``sealed``) once the reported total reaches ``target_clients`` or at the
  deadline, and waits in phase ``sealing``;
* a sealed worker takes no more updates (they are ``late``), commits its
  phase ``sealed`` and reports its durable partial sum with the proofs of
  every update in it, again every ``resend_ms`` until the root moves on;
* with the sealed sums of all shards the root checks them (signature,
  round, each proof's device in that shard, no device twice, the proof
  count), adds them into the one sum and closes the round as a single
  aggregator does (the committee request, ``decrypting``); below
  ``min_clients`` it fails the round; if some worker never reports within
  ``seal_timeout_ms`` it fails the round (``workers``).

A device's update is counted in one shard only: a worker refuses a device
of another shard (``wrong_shard``) whatever topic it came on, and the root
refuses a sealed sum naming a device of another shard, or a device twice.
Crash safety is the single aggregator's, per process: a worker's accepted
updates and its seal are in its own store before any receipt or report; the
root's seal and close are in its store; a restarted root waits for the
sealed sums again (workers re-send them), a restarted worker re-reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy.typing as npt

from aggregator.committee import CommitteeVerifier
from aggregator.optimizers import ServerOptimizer
from aggregator.planning import RoundPlan
from aggregator.rounds import (
    Action,
    Alert,
    Commit,
    ControlReceived,
    Event,
    KeyholderAnswered,
    MessageReceived,
    PartialReceived,
    PersistAccepted,
    Publish,
    Rejected,
    RoundConfig,
    RoundMachine,
    RoundRecord,
    Start,
    Tick,
    WitnessGapReported,
    _announced_clip,
)
from edge_sdk.crypto import (
    CiphertextAccumulator,
    CiphertextVector,
    DJNBase,
    PackingSpec,
)
from edge_sdk.errors import DecodeError, InvalidCiphertextError, InvalidSignatureError
from edge_sdk.identity import DeviceIdentity, DeviceRegistry, verify_message
from edge_sdk.pipeline import noise_digest
from edge_sdk.protocol import (
    ContributorProof,
    EncryptedUpdate,
    KeyholderRequest,
    PartialSum,
    RoundAnnouncement,
    ShardControl,
    WitnessGap,
    shard_of,
    split_payload,
)
from edge_sdk.protocol.limits import MAX_ANNOUNCEMENT_BYTES

__all__ = [
    "ControlReceived",
    "PartialReceived",
    "RootMachine",
    "WorkerMachine",
    "worker_id",
]

#: A worker re-sends its sealed partial sum this often until the root moves on.
DEFAULT_RESEND_MS = 3_000
#: A collecting worker reports its count at most this often (and at least every 4x).
DEFAULT_REPORT_MS = 250
#: A root fails a sealed round whose workers have not all reported within this.
DEFAULT_SEAL_TIMEOUT_MS = 300_000


def worker_id(shard: int) -> str:
    """The id of the worker owning ``shard`` (its MQTT client id and partial topic)."""
    return f"worker-{shard}"


def _verify(identity: DeviceIdentity | None, message: Any) -> None:
    """Root and workers share the aggregator identity: each checks the other's signature."""
    if identity is not None:
        verify_message(message, identity.public_key_bytes)


class WorkerMachine(RoundMachine):
    """One shard of a round: the single aggregator's intake, the root's rounds.

    Args:
        config, plan, registry, optimizer, initial_weights, committee,
            identity, binding: as :class:`~aggregator.rounds.RoundMachine`
            (the same federation settings as the root; the identity is the
            aggregator's, which signs receipts and partial sums).
        shard: the shard this worker owns.
        shards: the number of workers.
        report_ms: least time between two count reports while collecting.
        resend_ms: a sealed partial sum is sent again this often.
    """

    def __init__(
        self,
        config: RoundConfig,
        plan: RoundPlan,
        registry: DeviceRegistry,
        optimizer: ServerOptimizer,
        *,
        shard: int,
        shards: int,
        initial_weights: npt.ArrayLike | None = None,
        committee: CommitteeVerifier,
        identity: DeviceIdentity | None = None,
        binding: DJNBase | None = None,
        report_ms: int = DEFAULT_REPORT_MS,
        resend_ms: int = DEFAULT_RESEND_MS,
    ) -> None:
        """Create the worker; it opens no round until the root's control names one."""
        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in 0..{shards - 1}, got {shard}")
        super().__init__(
            config,
            plan,
            registry,
            optimizer,
            initial_weights=initial_weights,
            committee=committee,
            identity=identity,
            binding=binding,
        )
        self.shard = shard
        self.shards = shards
        self.worker_id = worker_id(shard)
        self.intake.shard = (shard, shards)
        self.report_ms = report_ms
        self.resend_ms = resend_ms
        self._reported: tuple[int, int] = (-1, -1)  # (round, count) last reported
        self._sealed_report: tuple[int, tuple[Action, ...]] = (-1, ())
        self._last_report_ms = -(1 << 62)

    # -- what differs from a single aggregator -----------------------------------

    def _capacity(self) -> int:
        # Each shard's share of the packing headroom: the root's sum of every
        # shard never exceeds what the packing was sized for.
        return self.plan.max_contributors // self.shards

    def _after_accept(self, now: int) -> list[Action]:
        return []  # the root decides when the round closes

    def _ahead(self, device: str, update: EncryptedUpdate, now: int) -> list[Action]:
        # The root's announcement can reach a device before its control message
        # reaches this worker: no receipt (a rejection would end the device's
        # try); it resends, and by then this worker has the round.
        detail = f"worker on round {self.round_id}"
        return [Rejected(device_id=device, round_id=update.round_id, reason="ahead", detail=detail)]

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to execute, in order."""
        if isinstance(event, ControlReceived):
            return self._on_control(event.control, event.now_ms)
        if isinstance(event, Start):
            return self._report(event.now_ms, force=True)
        if isinstance(event, KeyholderAnswered):
            return []  # the root's business
        if self._record is None:
            if isinstance(event, MessageReceived):
                # no round adopted yet: the device resends until it has a receipt
                return [Rejected(device_id=None, round_id=None, reason="no_round")]
            return []
        if isinstance(event, Tick):
            return self._report(event.now_ms)
        if isinstance(event, WitnessGapReported):
            return self._on_worker_gap(event.gap, event.now_ms)
        return super().handle(event)

    def _on_control(self, control: ShardControl, now: int) -> list[Action]:
        try:
            if control.federation != self.config.federation:
                raise ValueError("another federation")
            _verify(self.identity, control)
            ann = RoundAnnouncement.from_bytes(
                control.announcement, max_size=MAX_ANNOUNCEMENT_BYTES
            )
            _verify(self.identity, ann)
            if ann.round_id != control.round_id or ann.federation != control.federation:
                raise ValueError("announcement of another round")
            if ann.shards != self.shards:
                raise ValueError(f"the round has {ann.shards} shards, this worker {self.shards}")
            if ann.key_fingerprint != self._fingerprint:
                raise ValueError("announcement under another Paillier key")
        except (DecodeError, InvalidSignatureError, ValueError) as exc:
            return [
                Rejected(device_id=None, round_id=control.round_id, reason="bad_control"),
                Alert(kind="bad_control", round_id=control.round_id, detail=str(exc)[:200]),
            ]
        current = self.round_id
        actions: list[Action] = []
        if self._record is None or control.round_id > current:
            actions += self._adopt(ann, now)
        elif control.round_id < current:
            return []  # an old retained copy
        if control.finished:
            self.finished = True  # the root ran its rounds (phase reads "finished")
            return actions
        if control.sealed and self.phase == "collecting":
            assert self._record is not None
            sealed = dataclasses.replace(
                self._record, phase="sealed", closed_ms=now, count=self._acc.count
            )
            self._record = sealed
            actions.append(Commit(records=(sealed,)))
        if self.phase == "sealed":
            actions += self._report(now, force=True)
        return actions

    def _adopt(self, ann: RoundAnnouncement, now: int) -> list[Action]:
        """Open the root's round here (a new record, an empty partial sum)."""
        record = RoundRecord(
            round_id=ann.round_id,
            phase="collecting",
            announcement=ann.to_bytes(),
            opened_ms=ann.issued_ms,
        )
        first = self._model is None
        if first:
            self.optimizer.load_state(b"")
            self._model = self._initial_model(now)
        self._record = record
        self._announcement = ann
        self._set_layout(PackingSpec.from_bytes(ann.packing), noise_digest(ann.privacy))
        self._clip = _announced_clip(ann, self.plan.clip)
        self._acc = CiphertextAccumulator(self.public_key, self._num_ct)
        self._accepted = {}
        self._reset_shares()
        self._history[ann.round_id] = {}
        for old in sorted(self._history)[: -self.config.history_rounds]:
            del self._history[old]
        self.intake.discard()
        if first:
            return [
                Commit(
                    records=(record,),
                    model=self._model,
                    optimizer_state=self.optimizer.state_bytes(),
                )
            ]
        return [Commit(records=(record,))]

    def _report(self, now: int, *, force: bool = False) -> list[Action]:
        """A count report (collecting) or the whole sealed partial sum, when due."""
        if self._record is None or self.finished:
            return []
        sealed = self.phase == "sealed"
        key = (self.round_id, self._acc.count)
        since = now - self._last_report_ms
        if not force:
            if sealed and since < self.resend_ms:
                return []
            if not sealed and (
                since < self.report_ms or (key == self._reported and since < 4 * self.report_ms)
            ):
                return []
            if self.phase not in ("collecting", "sealed"):
                return []
        self._reported = key
        self._last_report_ms = now
        if sealed and self._sealed_report[0] == self.round_id:
            return list(self._sealed_report[1])  # a re-send: the same signed bytes
        contributors = b""
        if sealed:
            proofs = tuple(self._accepted[d] for d in sorted(self._accepted))
            contributors = KeyholderRequest.pack_proofs(proofs)
        partial = self._sign(
            PartialSum(
                federation=self.config.federation,
                round_id=self.round_id,
                worker_id=self.worker_id,
                shard=self.shard,
                shards=self.shards,
                sealed=int(sealed),
                count=self._acc.count,
                encrypted_sum=self._acc.value.to_bytes() if sealed and self._acc.count else b"",
                contributors=contributors,
                issued_ms=self._record.closed_ms if sealed else now,
            )
        )
        topic = self.topics.partial(self.worker_id)
        actions: list[Action] = [
            Publish(topic=topic, payload=c.to_bytes())
            for c in split_payload(
                partial.to_bytes(),
                federation=self.config.federation,
                stream="update",
                sender=self.worker_id,
                round_id=self.round_id,
                max_message_size=self.config.max_message_size,
            )
        ]
        if sealed:  # nothing of a sealed round changes: kept for the re-sends
            self._sealed_report = (self.round_id, tuple(actions))
        return actions

    def _on_worker_gap(self, gap: WitnessGap, now: int) -> list[Action]:
        """A member missed updates of a sealed round: relay those of this shard."""
        if (
            self.phase != "sealed"
            or gap.federation != self.config.federation
            or gap.round_id != self.round_id
        ):
            return []
        try:
            self.committee.check_gap(gap)
        except InvalidSignatureError as exc:
            return [
                Rejected(device_id=None, round_id=gap.round_id, reason=f"witness_gap_{exc.reason}")
            ]
        return self._relay_due(gap, now)


class RootMachine(RoundMachine):
    """The round of a sharded aggregator: announcement, close, decryption, model.

    Args:
        config, plan, registry, optimizer, initial_weights, committee,
            identity, binding: as :class:`~aggregator.rounds.RoundMachine`.
        shards: the number of workers (each owns one shard).
        seal_timeout_ms: fail a sealed round whose workers have not all sent
            their sealed partial sums within this.
    """

    def __init__(
        self,
        config: RoundConfig,
        plan: RoundPlan,
        registry: DeviceRegistry,
        optimizer: ServerOptimizer,
        *,
        shards: int,
        initial_weights: npt.ArrayLike | None = None,
        committee: CommitteeVerifier,
        identity: DeviceIdentity | None = None,
        binding: DJNBase | None = None,
        seal_timeout_ms: int = DEFAULT_SEAL_TIMEOUT_MS,
    ) -> None:
        """Create the root."""
        if shards < 2:
            raise ValueError(f"a sharded root needs >= 2 workers, got {shards}")
        if config.target_clients > (plan.max_contributors // shards) * shards:
            raise ValueError(
                "target_clients exceeds what the workers' shares of the packing headroom "
                f"hold ({shards} x {plan.max_contributors // shards})"
            )
        super().__init__(
            config,
            plan,
            registry,
            optimizer,
            initial_weights=initial_weights,
            committee=committee,
            identity=identity,
            binding=binding,
        )
        self.shards = shards
        self.announce_shards = shards
        self.seal_timeout_ms = seal_timeout_ms
        self._progress: dict[int, int] = {}
        self._sealed: dict[int, tuple[CiphertextVector | None, tuple[ContributorProof, ...]]] = {}

    @property
    def count(self) -> int:
        """Updates in the current round: the workers' reported total until it is combined."""
        if self.phase in ("collecting", "sealing"):
            return sum(self._progress.values())
        return self._acc.count

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to execute, in order."""
        if isinstance(event, PartialReceived):
            if self._record is None:
                raise RuntimeError("feed Start before any other event")
            return self._on_partial(event.partial, event.now_ms)
        if isinstance(event, MessageReceived):
            # the workers take updates; the root does not subscribe to them
            return [Rejected(device_id=None, round_id=None, reason="root_takes_no_updates")]
        if isinstance(event, WitnessGapReported):
            return []  # the workers hold the updates and answer gap notices
        return super().handle(event)

    def _open(self, round_id: int, now: int) -> RoundRecord:
        record = super()._open(round_id, now)
        self._progress = {}
        self._sealed = {}
        return record

    def _publish_round(self) -> list[Action]:
        return [*super()._publish_round(), self._control()]

    def _control(self) -> Publish:
        """The retained control message of the current round (re-signed to the same bytes)."""
        assert self._record is not None and self._announcement is not None
        control = self._sign(
            ShardControl(
                federation=self.config.federation,
                round_id=self._record.round_id,
                announcement=self._announcement.to_bytes(),
                sealed=int(self._record.phase != "collecting"),
                finished=int(self.finished),
                issued_ms=self._record.closed_ms or self._record.opened_ms,
            )
        )
        return Publish(topic=self.topics.shard_control, payload=control.to_bytes(), retain=True)

    def _decrypted(self, now: int) -> list[Action]:
        actions = super()._decrypted(now)
        if self.finished:  # no round follows: the workers may stop
            actions.append(self._control())
        return actions

    def _seal(self, now: int) -> list[Action]:
        assert self._record is not None
        record = dataclasses.replace(self._record, phase="sealing", closed_ms=now)
        self._record = record
        return [Commit(records=(record,)), *self._publish_round()]

    def _on_tick(self, now: int) -> list[Action]:
        if self.finished or self._record is None:
            return []
        if self.phase == "collecting":
            if self.count >= self.config.target_clients or now >= self._record_deadline():
                return self._seal(now)
            return []
        if self.phase == "sealing":
            if now - self._record.closed_ms >= self.seal_timeout_ms:
                missing = sorted(set(range(self.shards)) - set(self._sealed))
                return [
                    Alert(
                        kind="workers_missing",
                        round_id=self.round_id,
                        detail=f"no sealed partial sum from shards {missing}",
                    ),
                    *self._fail("workers", now),
                ]
            return []
        return super()._on_tick(now)

    def _bad_partial(self, partial: PartialSum, detail: str) -> list[Action]:
        return [
            Rejected(
                device_id=None, round_id=partial.round_id, reason="bad_partial", detail=detail
            ),
            Alert(
                kind="bad_partial",
                round_id=partial.round_id,
                detail=f"{partial.worker_id}: {detail}"[:200],
            ),
        ]

    def _on_partial(self, partial: PartialSum, now: int) -> list[Action]:
        if (
            partial.federation != self.config.federation
            or partial.round_id != self.round_id
            or self.phase not in ("collecting", "sealing")
        ):
            return []  # another round's (a re-send after the root moved on)
        try:
            _verify(self.identity, partial)
        except InvalidSignatureError:
            return self._bad_partial(partial, "signature")
        if partial.shards != self.shards or partial.worker_id != worker_id(partial.shard):
            return self._bad_partial(partial, f"shard {partial.shard} of {partial.shards}")
        if not partial.sealed:
            self._progress[partial.shard] = partial.count
            if self.phase == "collecting" and self.count >= self.config.target_clients:
                return self._seal(now)
            return []
        if self.phase != "sealing" or partial.shard in self._sealed:
            return []  # sealed before the root's seal is not possible; a re-send
        checked = self._check_sealed(partial)
        if isinstance(checked, str):
            return self._bad_partial(partial, checked)
        self._sealed[partial.shard] = checked
        self._progress[partial.shard] = partial.count
        if len(self._sealed) < self.shards:
            return []
        return self._combine(now)

    def _check_sealed(
        self, partial: PartialSum
    ) -> tuple[CiphertextVector | None, tuple[ContributorProof, ...]] | str:
        """The sealed sum and its proofs, or why they are refused."""
        try:
            proofs = partial.proofs()
        except DecodeError as exc:
            return f"contributors: {exc}"
        if len(proofs) != partial.count:
            return f"{len(proofs)} proofs for a count of {partial.count}"
        seen: set[str] = set()
        for proof in proofs:
            if proof.round_id != partial.round_id:
                return f"proof of {proof.device_id} names round {proof.round_id}"
            if shard_of(proof.device_id, self.shards) != partial.shard:
                return f"device {proof.device_id} is not in shard {partial.shard}"
            if proof.device_id in seen:
                return f"device {proof.device_id} twice"
            seen.add(proof.device_id)
        if not partial.count:
            return None, proofs
        try:
            vector = CiphertextVector.from_bytes(
                partial.encrypted_sum, self.public_key, self._num_ct
            )
        except InvalidCiphertextError as exc:
            return f"sum: {exc}"
        return vector, proofs

    def _combine(self, now: int) -> list[Action]:
        """Add the shards' sealed sums into the round's one sum; close or fail as one would."""
        acc = CiphertextAccumulator(self.public_key, self._num_ct)
        accepted: dict[str, ContributorProof] = {}
        for shard in sorted(self._sealed):
            vector, proofs = self._sealed[shard]
            for proof in proofs:
                if proof.device_id in accepted:  # shard_of makes this impossible; checked anyway
                    return [
                        Alert(
                            kind="double_counted", round_id=self.round_id, detail=proof.device_id
                        ),
                        *self._fail("double_counted", now),
                    ]
                accepted[proof.device_id] = proof
            if vector is not None:
                acc.merge(vector, len(proofs))
        self._acc = acc
        self._accepted = accepted
        self._history.setdefault(self.round_id, {}).update(
            {d: p.update_digest for d, p in accepted.items()}
        )
        if acc.count < self.config.min_clients:
            return self._fail("quorum", now)
        actions = self._close(now)
        close = actions[0]
        assert isinstance(close, Commit)
        # The combined rows and sum are made durable with the close, in its
        # one transaction: a restarted root resumes decrypting exactly this sum.
        rows = [
            PersistAccepted(
                round_id=self.round_id,
                device_id=device,
                update_digest=proof.update_digest,
                proof=proof.to_bytes(),
                sum_blob=b"",
                count=i + 1,
                at_ms=now,
            )
            for i, (device, proof) in enumerate(sorted(accepted.items()))
        ]
        rows[-1] = dataclasses.replace(rows[-1], sum_blob=acc.value.to_bytes())
        return [dataclasses.replace(close, accepted=tuple(rows)), *actions[1:]]
