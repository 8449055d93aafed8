"""The aggregator service: the round machine wired to a store, a transport and a key holder.

Durability contract (see docs/operations.md):

* inbound updates arrive on a durable MQTT session (fixed client id,
  ``clean_start=False``, session expiry, ``manual_ack=True``); a message is
  acknowledged to the broker only after every action it caused ran, so the
  accepted row and the running sum are committed before the PUBACK; a
  crash before that makes the broker redeliver it;
* group commit (``commit_batch`` > 1): accepted updates are committed in
  batches, one transaction (one fsync) each, bounded by ``commit_batch``
  updates and ``commit_max_ms`` milliseconds, and flushed whenever the
  inbound queue runs dry, before any round transition and at shutdown.
  While a batch is open every publication (receipts of any status,
  announcements, models) and every broker acknowledgement waits, in order,
  until the batch is durable: no device ever holds a receipt for an update
  a crash could lose, and every message a crash could lose is still
  unacknowledged at the broker (redelivered on restart). With
  ``commit_batch = 1`` each update is its own transaction, as before;
* a chunk that does not complete an update is acknowledged at once (it is
  only held in memory; devices resend until they get a receipt);
* on every start and every reconnect the retained round announcement and
  global model are re-published from the store (broker persistence is a
  periodic snapshot and can lose them).

Handlers run on the transport's thread and only enqueue; the machine, the
store and the in-process key holder are driven from :meth:`AggregatorService.pump`
on one thread.

Test hook: ``EDGEFL_CRASH_AT=<point>:<n>`` (comma-separated list allowed)
kills the process with SIGKILL the ``n``-th time it reaches ``point``. Points:
``accept_before_commit``, ``accept_after_commit``, ``close_before_commit``,
``close_after_commit``, ``result_before_commit``, ``result_after_commit``,
``fail_after_commit``, ``before_decrypt``, ``after_decrypt``, ``after_start``.
``accept_before_commit`` / ``accept_after_commit`` count accepted UPDATES in
both modes: with group commit the n-th visit is just before / after the
transaction of the batch holding the n-th update (before any receipt of that
batch). Points inside a batch (group commit only): ``accept_queued`` (an
update joined the open batch: accepted in memory, nothing durable, nothing
sent), ``batch_before_commit``, ``batch_after_commit`` (per batch) and
``batch_receipt_sent`` (after each deferred receipt of a committed batch, so
``:2`` dies with part of a batch's receipts sent and none of its messages
acknowledged).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aggregator.keyholder import KeyHolder, exchange
from aggregator.metrics import Metrics
from aggregator.relay_log import RelayLog
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
    RelayUpdates,
    RequestDecryption,
    RoundMachine,
    SendReceipt,
    Start,
    Tick,
    WitnessGapReported,
)
from aggregator.shards import RootMachine, WorkerMachine
from aggregator.store import AggregatorStore
from edge_sdk.errors import DecodeError
from edge_sdk.identity import check_approvals_in_background
from edge_sdk.protocol import (
    Chunk,
    KeyholderResult,
    PartialSum,
    Reassembler,
    ShardControl,
    Topics,
    WitnessGap,
    parse_topic,
    shard_of,
    split_payload,
)
from edge_sdk.protocol.limits import MAX_ANNOUNCEMENT_BYTES, MAX_REQUEST_BYTES, MAX_SHARE_BYTES
from edge_sdk.transport import InboundMessage, Transport, TransportError

__all__ = [
    "CRASH_ENV",
    "DEFAULT_COMMIT_BATCH",
    "DEFAULT_COMMIT_MAX_MS",
    "AggregatorService",
    "AlertLimiter",
    "CrashHook",
]

log = logging.getLogger("edgefl.aggregator")

CRASH_ENV = "EDGEFL_CRASH_AT"

#: Group commit defaults (``[aggregator] commit_batch`` / ``commit_max_ms``).
DEFAULT_COMMIT_BATCH = 64
DEFAULT_COMMIT_MAX_MS = 5.0


class CrashHook:
    """Kills the process at a named point (tests of crash safety only).

    Args:
        spec: ``point:n[,point:n...]``; None reads ``$EDGEFL_CRASH_AT``.
    """

    def __init__(self, spec: str | None = None) -> None:
        """Parse the spec (empty: never crash)."""
        text = os.environ.get(CRASH_ENV, "") if spec is None else spec
        self._left: dict[str, int] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            point, _, n = item.partition(":")
            self._left[point] = int(n or "1")

    def hit(self, point: str) -> None:
        """Count a visit to ``point``; SIGKILL ourselves on the configured visit."""
        if point not in self._left:
            return
        self._left[point] -= 1
        if self._left[point] <= 0:
            log.warning("crash hook: SIGKILL at %s", point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def _commit_kind(action: Commit) -> str:
    last = action.records[-1]
    if action.model is not None and action.model.version == 0:
        return "init"
    if last.phase in ("sealing", "sealed"):
        return "seal"  # a sharded root or worker ends collection
    if last.phase == "collecting" and len(action.records) == 1 and action.model is None:
        return "open"  # a worker adopts the root's next round
    if last.phase == "decrypting":
        return "close"
    if action.model is not None:
        return "result"
    return "fail"


class AlertLimiter:
    """Bounds the alert lines one sender can cause (every alert is still counted).

    A device re-signing mutated updates raises an equivocation alert per
    message; without a bound one device floods the log. Per (kind, device)
    at most ``per_window`` lines are logged per ``window_ms``; the last one
    says that further ones are suppressed.

    Args:
        per_window: lines logged per (kind, device) and window.
        window_ms: the window.
        max_keys: senders tracked at once (the oldest is forgotten).
    """

    def __init__(
        self, per_window: int = 5, window_ms: int = 3_600_000, max_keys: int = 100_000
    ) -> None:
        """Create the limiter."""
        self.per_window = per_window
        self.window_ms = window_ms
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str | None], tuple[int, int]] = {}
        self.suppressed = 0

    def admit(self, kind: str, device_id: str | None, now_ms: int) -> str:
        """``log``, ``last`` (log it and say the rest is suppressed) or ``suppress``."""
        key = (kind, device_id)
        start, count = self._seen.get(key, (now_ms, 0))
        if now_ms - start >= self.window_ms:
            start, count = now_ms, 0
        count += 1
        self._seen.pop(key, None)
        self._seen[key] = (start, count)
        if len(self._seen) > self.max_keys:
            self._seen.pop(next(iter(self._seen)))
        if count < self.per_window:
            return "log"
        if count == self.per_window:
            return "last"
        self.suppressed += 1
        return "suppress"


class AggregatorService:
    """Runs the round machine over a transport.

    Args:
        machine: the round machine (restored from the store by :meth:`start`).
        store: the durable store.
        transport: any :class:`~edge_sdk.transport.Transport` (manual acks).
        keyholders: in-process committee members (development only: they
            share the aggregator's process, so nothing is defended against
            whoever runs it). Empty (the default) means the committee is
            reached over ``keyholder/request`` and ``keyholder/result/+``.
        metrics: Prometheus metrics (no-op when prometheus-client is absent).
        clock_ms: wall clock in milliseconds (injected for tests).
        crash: crash hook (tests).
        commit_batch: most accepted updates per transaction (1: one commit per
            update, no deferral; the pre-group-commit behaviour).
        commit_max_ms: an open batch is committed once its oldest update has
            waited this long (it is also committed whenever the inbound
            queue runs dry).
        relay_dir: where accepted updates are kept until their round ends
            (:class:`aggregator.relay_log.RelayLog`), to relay them to a
            committee member whose broker lost its copy (``keyholder/gap``
            -> ``keyholder/relay``). Never fsynced: the relay is an
            availability aid, and a member checks every relayed update's
            device signature. None: no relay.
    """

    def __init__(
        self,
        machine: RoundMachine,
        store: AggregatorStore,
        transport: Transport,
        *,
        keyholders: Sequence[KeyHolder] = (),
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] | None = None,
        crash: CrashHook | None = None,
        commit_batch: int = DEFAULT_COMMIT_BATCH,
        commit_max_ms: float = DEFAULT_COMMIT_MAX_MS,
        relay_dir: Path | None = None,
    ) -> None:
        """Create the service (no I/O until :meth:`start`)."""
        if commit_batch < 1:
            raise ValueError(f"commit_batch must be >= 1, got {commit_batch}")
        if commit_max_ms < 0:
            raise ValueError(f"commit_max_ms must be >= 0, got {commit_max_ms}")
        if keyholders and isinstance(machine, (RootMachine, WorkerMachine)):
            raise ValueError("in-process key holders cannot serve a sharded aggregator")
        self.machine = machine
        self.store = store
        self.transport = transport
        self.keyholders = tuple(keyholders)
        self.metrics = metrics or Metrics(enabled=False)
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.crash = crash or CrashHook("")
        self.topics = Topics(machine.config.federation)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._kh_reassembler = Reassembler(max_payload_size=MAX_SHARE_BYTES, max_pending=8)
        # a sharded root: its workers' partial sums (a sealed one can be large)
        self._partial_reassembler = Reassembler(max_payload_size=MAX_REQUEST_BYTES, max_pending=8)
        self.alerts = AlertLimiter()
        self._started = False
        self.commit_batch = commit_batch
        self.commit_max_s = commit_max_ms / 1000.0
        # Group commit: accepted updates not yet durable, and what waits for
        # them (publications and broker acks, in order).
        self._batch: list[PersistAccepted] = []
        self._batch_opened = 0.0
        self._deferred: list[Action | InboundMessage] = []
        # Transactions that committed accepted updates, and those updates.
        self.accept_commits = 0
        self.updates_committed = 0
        self._relay_log = None if relay_dir is None else RelayLog(relay_dir)
        self.relayed = 0
        self._approval_check: threading.Event | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self, *, connect_timeout: float | None = 30.0) -> None:
        """Restore from the store, subscribe, connect and re-publish retained state."""
        snapshot = self.store.load_snapshot(self.machine.config.history_rounds)
        if snapshot is not None:
            self.machine.restore(snapshot)
            log.info(
                "resumed round %d (%s) with %d updates",
                snapshot.current.round_id,
                snapshot.current.phase,
                snapshot.count,
            )
        self._subscribe()
        self.transport.on_connection_change(self._on_connection)
        self.transport.connect(timeout=connect_timeout)
        self._started = True
        self._check_approvals()
        self._fit_chunks_to_transport()
        self.feed(Start(now_ms=self.clock_ms()))
        self.crash.hit("after_start")

    def _check_approvals(self) -> None:
        """Check the committee's approvals of this process's devices in the background.

        A root takes no device updates; a worker only its shard's devices.
        """
        machine = self.machine
        if isinstance(machine, RootMachine) or self._approval_check is not None:
            return
        ids = machine.registry.active_ids()
        if isinstance(machine, WorkerMachine):
            ids = [d for d in ids if shard_of(d, machine.shards) == machine.shard]
        self._approval_check = check_approvals_in_background(
            machine.registry, ids, name="approval-check"
        )

    def _subscribe(self) -> None:
        """What this service takes: a single aggregator, a sharded root or one worker."""
        machine = self.machine
        sub = self.transport.subscribe
        if isinstance(machine, WorkerMachine):
            # its shard's updates, the root's control, and gap notices (it holds the updates)
            sub(self.topics.shard_updates_filter(machine.shard), self._on_message, qos=1)
            sub(self.topics.shard_control, self._on_control_message, qos=1)
            sub(self.topics.keyholder_gap_filter, self._on_gap_message, qos=1)
            return
        if isinstance(machine, RootMachine):
            sub(self.topics.partial_filter, self._on_partial_message, qos=1)
            sub(self.topics.keyholder_result_filter, self._on_kh_message, qos=1)
            return
        sub(self.topics.updates_filter, self._on_message, qos=1)
        if not self.keyholders:
            sub(self.topics.keyholder_result_filter, self._on_kh_message, qos=1)
            sub(self.topics.keyholder_gap_filter, self._on_gap_message, qos=1)

    @property
    def done(self) -> bool:
        """The configured rounds are done (a worker learns it from its root)."""
        return self.machine.finished

    def _fit_chunks_to_transport(self) -> None:
        """Chunk models to what the broker accepts.

        The broker's maximum packet size (MQTT 5 CONNACK) can be smaller than
        the configured ``max_message_size``; model chunks cut to the larger
        size would be refused by the transport on every publish, and devices
        would never get the model.
        """
        limit = self.transport.max_payload_size(self.topics.model(0))
        config = self.machine.config
        if limit < config.max_message_size:
            log.info("broker limit: model chunks of at most %d bytes", limit)
            self.machine.config = dataclasses.replace(config, max_message_size=limit)

    def close(self) -> None:
        """Commit the open batch (sending what waited for it), disconnect, close the store."""
        if self._approval_check is not None:
            self._approval_check.set()
        try:
            self.flush_batch()
            self.transport.flush(timeout=5.0)
            self.transport.close()
        finally:
            if self._relay_log is not None:
                self._relay_log.close()
            self.store.close()

    # -- transport callbacks (transport thread: enqueue only) -------------------

    def _on_message(self, message: InboundMessage) -> None:
        self._queue.put(("update", message))

    def _on_kh_message(self, message: InboundMessage) -> None:
        self._queue.put(("keyholder", message))

    def _on_gap_message(self, message: InboundMessage) -> None:
        self._queue.put(("gap", message))

    def _on_control_message(self, message: InboundMessage) -> None:
        self._queue.put(("control", message))

    def _on_partial_message(self, message: InboundMessage) -> None:
        self._queue.put(("partial", message))

    def _on_connection(self, event: Any) -> None:
        if getattr(event, "connected", False):
            self._queue.put(("reconnected", None))

    # -- the loop ----------------------------------------------------------------

    def pump(self, timeout: float = 0.0) -> int:
        """Process queued messages (waiting up to ``timeout`` for the first), then tick.

        Returns:
            The number of queued items processed.
        """
        done = 0
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            self._process(*item)
            done += 1
            if self._batch and (
                len(self._batch) >= self.commit_batch
                or time.monotonic() - self._batch_opened >= self.commit_max_s
            ):
                self.flush_batch()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = None
        self.flush_batch()  # the queue ran dry: nothing more to group with
        self.feed(Tick(now_ms=self.clock_ms()))
        self.store.flush_rejections()
        return done

    def serve_forever(self, stop: threading.Event, *, tick_s: float = 0.2) -> None:
        """Pump until ``stop`` is set."""
        while not stop.is_set():
            self.pump(timeout=tick_s)

    def _process(self, kind: str, message: InboundMessage | None) -> None:
        if kind == "reconnected":
            if self._started:
                log.info("reconnected: re-publishing the retained round and model")
                self._fit_chunks_to_transport()
                self.feed(Start(now_ms=self.clock_ms()))
            return
        assert message is not None
        if kind == "update":
            for member in self.keyholders:  # development mode: they witness in-process
                member.witness(message.topic, message.payload)
            self.feed(
                MessageReceived(
                    topic=message.topic, payload=message.payload, now_ms=self.clock_ms()
                )
            )
        elif kind == "keyholder":
            self._keyholder_message(message)
        elif kind == "gap":
            self._gap_message(message)
        elif kind == "control":
            self._control_message(message)
        elif kind == "partial":
            self._partial_message(message)
        if self._batch:
            self._deferred.append(message)  # acknowledged once the batch is durable
        else:
            message.ack()

    @staticmethod
    def _reassemble(message: InboundMessage, kind: str, into: Reassembler) -> bytes | None:
        """A chunk of a sender's own ``{kind}/{sender}`` topic; the whole payload once complete.

        Raises:
            DecodeError: not a chunk, or not from the sender its topic names.
        """
        parsed = parse_topic(message.topic)
        chunk = Chunk.from_bytes(message.payload)
        if parsed is None or parsed.kind != kind or chunk.sender != parsed.device_id:
            raise DecodeError(f"chunk not from its sender's {kind} topic", reason="sender")
        return into.add(chunk)

    def _keyholder_message(self, message: InboundMessage) -> None:
        try:
            payload = self._reassemble(message, "keyholder/result", self._kh_reassembler)
            if payload is None:
                return
            result = KeyholderResult.from_bytes(payload, max_size=MAX_SHARE_BYTES)
        except DecodeError as exc:
            log.warning("bad key holder message: %s", exc)
            self.metrics.rejection(f"keyholder_{exc.reason}")
            return
        self.feed(KeyholderAnswered(result=result, now_ms=self.clock_ms()))

    def _gap_message(self, message: InboundMessage) -> None:
        try:
            parsed = parse_topic(message.topic)
            gap = WitnessGap.from_bytes(message.payload, max_size=128 * 1024)
            if (
                parsed is None
                or parsed.kind != "keyholder/gap"
                or parsed.device_id != gap.holder_id
            ):
                raise DecodeError("gap notice not on its member's topic", reason="sender")
        except DecodeError as exc:
            log.warning("bad witness-gap notice: %s", exc)
            self.metrics.rejection(f"witness_gap_{exc.reason}")
            return
        self.feed(WitnessGapReported(gap=gap, now_ms=self.clock_ms()))

    def _control_message(self, message: InboundMessage) -> None:
        if not message.payload:
            return  # a cleared retained message
        try:
            control = ShardControl.from_bytes(message.payload, max_size=2 * MAX_ANNOUNCEMENT_BYTES)
        except DecodeError as exc:
            log.warning("bad control message: %s", exc)
            self.metrics.rejection(f"control_{exc.reason}")
            return
        self.feed(ControlReceived(control=control, now_ms=self.clock_ms()))

    def _partial_message(self, message: InboundMessage) -> None:
        try:
            payload = self._reassemble(message, "aggregator/partial", self._partial_reassembler)
            if payload is None:
                return
            partial = PartialSum.from_bytes(payload, max_size=MAX_REQUEST_BYTES)
            if message.topic != self.topics.partial(partial.worker_id):
                raise DecodeError("partial sum of another worker", reason="sender")
        except DecodeError as exc:
            log.warning("bad partial sum: %s", exc)
            self.metrics.rejection(f"partial_{exc.reason}")
            return
        self.feed(PartialReceived(partial=partial, now_ms=self.clock_ms()))

    # -- the witness relay -----------------------------------------------------------

    def _keep_for_relay(self, action: PersistAccepted) -> None:
        if self._relay_log is None or not action.update:
            return
        try:
            self._relay_log.keep(action.round_id, action.device_id, action.update)
        except OSError as exc:  # the relay is an aid: a full disk must not stop the round
            log.warning("cannot keep %s's update for the witness relay: %s", action.device_id, exc)

    def _relay(self, action: RelayUpdates) -> None:
        if self._relay_log is None:
            log.info(
                "%s missed %d updates; no relay folder", action.holder_id, len(action.device_ids)
            )
            return
        topic = self.topics.keyholder_relay(action.holder_id)
        size = max(self.transport.max_payload_size(topic), 4096)
        for device in action.device_ids:
            try:
                payload = self._relay_log.get(action.round_id, device)
            except OSError as exc:
                log.warning(
                    "round %d: cannot read the kept update of %s: %s", action.round_id, device, exc
                )
                continue
            if payload is None:
                log.warning("round %d: no kept update of %s to relay", action.round_id, device)
                continue
            for piece in split_payload(
                payload,
                federation=self.machine.config.federation,
                stream="update",
                sender=device,
                round_id=action.round_id,
                max_message_size=size,
            ):
                self._publish(topic, piece.to_bytes(), retain=False)
            self.relayed += 1
            self.metrics.relayed(action.holder_id)

    def _drop_relay_copies(self) -> None:
        """Delete kept updates of rounds before the current one."""
        if self._relay_log is not None:
            self._relay_log.drop_before(self.machine.round_id)

    # -- actions -------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Run one event through the machine and execute its actions in order."""
        self._execute(self.machine.handle(event))

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, PersistAccepted):
                self._keep_for_relay(action)
                if self.commit_batch == 1:
                    if self._relay_log is not None:  # kept before the row is durable
                        self._relay_log.flush()
                    self.crash.hit("accept_before_commit")
                    self.store.persist_accepted(action)
                    self.accept_commits += 1
                    self.updates_committed += 1
                    self.crash.hit("accept_after_commit")
                    self.metrics.accepted(action.count)
                    continue
                if self._batch and self._batch[-1].round_id != action.round_id:
                    self.flush_batch()
                if not self._batch:
                    self._batch_opened = time.monotonic()
                self._batch.append(action)
                self.crash.hit("accept_queued")
            elif self._batch and isinstance(action, (Publish, SendReceipt)):
                self._deferred.append(action)  # depends on the open batch being durable
            elif isinstance(action, Commit):
                self.flush_batch()  # a transition is ordered after every accepted update
                kind = _commit_kind(action)
                self.crash.hit(f"{kind}_before_commit")
                self.store.commit(action)
                self.crash.hit(f"{kind}_after_commit")
                self._after_commit(action)
            elif isinstance(action, Publish):
                self._publish(action.topic, action.payload, retain=action.retain)
            elif isinstance(action, SendReceipt):
                self.metrics.receipt(action.receipt.status)
                self._publish(action.topic, action.receipt.to_bytes(), retain=False)
            elif isinstance(action, Rejected):
                self.metrics.rejection(action.reason)
                if action.reason != "late":
                    self.store.count_rejection(action.round_id, action.reason)
                log.info(
                    "rejected update: device=%s round=%s reason=%s %s",
                    action.device_id,
                    action.round_id,
                    action.reason,
                    action.detail,
                )
            elif isinstance(action, Alert):
                self.metrics.alert(action.kind)  # every event is counted
                verdict = self.alerts.admit(action.kind, action.device_id, self.clock_ms())
                if verdict == "log":
                    log.error(
                        "ALERT %s: round=%s device=%s %s",
                        action.kind,
                        action.round_id,
                        action.device_id,
                        action.detail,
                    )
                elif verdict == "last":
                    log.error(
                        "ALERT %s: round=%s device=%s %s (further %s alerts from this "
                        "device are counted in metrics, not logged, for %d s)",
                        action.kind,
                        action.round_id,
                        action.device_id,
                        action.detail,
                        action.kind,
                        self.alerts.window_ms // 1000,
                    )
            elif isinstance(action, RequestDecryption):
                self.flush_batch()
                self._request_decryption(action)
            elif isinstance(action, RelayUpdates):
                self._relay(action)

    def flush_batch(self) -> None:
        """Commit the open batch in one transaction, then send and ack what waited for it.

        A no-op without an open batch. If the commit raises, the service must
        exit (the machine is ahead of the store); nothing that waited was sent.
        """
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        deferred, self._deferred = self._deferred, []
        for _ in batch:
            self.crash.hit("accept_before_commit")
        if self._relay_log is not None:  # a durable update always has its relay copy
            self._relay_log.flush()
        self.crash.hit("batch_before_commit")
        self.store.persist_accepted_batch(batch)
        self.crash.hit("batch_after_commit")
        self.accept_commits += 1
        self.updates_committed += len(batch)
        for action in batch:
            self.crash.hit("accept_after_commit")
            self.metrics.accepted(action.count)
        for item in deferred:
            if isinstance(item, InboundMessage):
                item.ack()
            else:
                self._execute([item])
                if isinstance(item, SendReceipt):
                    self.crash.hit("batch_receipt_sent")

    def _after_commit(self, action: Commit) -> None:
        for rec in action.records:
            if rec.phase in ("done", "failed"):
                self.metrics.round_finished(rec.outcome or rec.phase)
        self._drop_relay_copies()
        self.metrics.state(
            round_id=self.machine.round_id,
            contributors=self.machine.count,
            model_version=self.machine.model.version if self.machine.model else 0,
        )

    def _request_decryption(self, action: RequestDecryption) -> None:
        self.crash.hit("before_decrypt")
        request = action.request
        if self.keyholders:
            started = time.perf_counter()
            results = exchange(self.keyholders, request)
            self.metrics.decrypt_seconds(time.perf_counter() - started)
            self.crash.hit("after_decrypt")
            for result in results:
                self.feed(KeyholderAnswered(result=result, now_ms=self.clock_ms()))
            return
        size = self.transport.max_payload_size(self.topics.keyholder_request)
        for chunk in split_payload(
            request.to_bytes(),
            federation=request.federation,
            stream="update",
            sender="aggregator",
            round_id=request.round_id,
            max_message_size=max(size, 4096),
        ):
            self._publish(self.topics.keyholder_request, chunk.to_bytes(), retain=False)

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        try:
            self.transport.publish(topic, payload, qos=1, retain=retain)
        except TransportError as exc:
            # Receipts are re-sent when the device retries; retained state is
            # re-published on reconnect; key holder requests are retried.
            log.warning("publish to %s failed: %s", topic, exc)
            self.metrics.publish_failed()
