"""A committee member as its own service over MQTT (one process per key holder).

Requests arrive on ``keyholder/request`` (chunked, sender ``aggregator``);
this member's results leave on ``keyholder/result/{holder_id}`` (chunked,
sender = the holder id). The member also subscribes read-only to the
devices' ``updates/+`` and feeds every message to its witness
(:meth:`aggregator.keyholder.KeyHolder.witness`): it decrypts only sums it
can rebuild from the devices' own signed ciphertexts.

A request whose contributors' updates have not all been witnessed yet waits
up to ``witness_grace_s`` for them (the aggregator re-asks); after that it is
refused, which costs the round, never privacy. While it waits, once no
update has arrived for ``relay_idle_s`` (the member is not merely behind),
it publishes a signed :class:`~edge_sdk.protocol.WitnessGap` naming the
missing devices on ``keyholder/gap/{holder}``; the aggregator relays those
devices' own signed updates on ``keyholder/relay/{holder}``, which the
witness checks exactly as broker-delivered ones, and the request is answered
as soon as nothing is missing. A broker that loses a member's copies (a
clustered broker losing a node) thus costs seconds, not the round.

The rounds it answered (request digests, never plaintexts) are kept in a
small JSON state file written BEFORE the share leaves, so a member killed at
any point and restarted never releases shares for two different sums of one
round. Every update it stores in its witness is appended to
``{state}-witness.log`` (:class:`~aggregator.witness_log.WitnessLog`), and
the broker message is acknowledged only once that log is fsynced: in batches
of up to ``witness_batch`` updates, or ``witness_sync_ms`` after the first
of a batch arrived (group commit; one fsync per batch, not two per update).
At start the log is read back and every update in it verified again: a
member killed mid-round loses none of the updates it had acknowledged, and
an update it had not acknowledged is redelivered by its durable session.
The log is compacted after each answered round (and whenever dead records
outnumber the live ones).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.committee import request_digest
from aggregator.keyholder import KeyHolder
from aggregator.witness_log import WitnessLog
from edge_sdk._fs import atomic_write
from edge_sdk.errors import DecodeError
from edge_sdk.identity import check_approvals_in_background
from edge_sdk.protocol import (
    Chunk,
    EncryptedUpdate,
    KeyholderCommit,
    KeyholderRequest,
    KeyholderResult,
    Reassembler,
    Topics,
    digest,
    parse_topic,
    split_payload,
)
from edge_sdk.protocol.limits import MAX_REQUEST_BYTES, MAX_UPDATE_BYTES
from edge_sdk.transport import InboundMessage, Transport, TransportError

__all__ = ["KeyholderService", "load_state", "save_state"]

log = logging.getLogger("edgefl.keyholder")


def load_state(keyholder: KeyHolder, path: Path | None) -> None:
    """Reload the rounds a member answered (a missing file is a fresh member)."""
    if path is None or not path.exists():
        return
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        answered = {int(k): bytes.fromhex(v) for k, v in doc.items()}
    except (OSError, ValueError, AttributeError) as exc:
        # Refuse to start rather than forget which sums were decrypted.
        raise RuntimeError(f"key holder state {path} is unreadable: {exc}") from None
    keyholder.restore_answered(answered)


def save_state(keyholder: KeyHolder, path: Path | None) -> None:
    """Durably write the rounds a member answered."""
    if path is None:
        return
    doc = {str(k): v.hex() for k, v in keyholder.answered_rounds().items()}
    atomic_write(path, json.dumps(doc).encode(), mode=0o600)


class KeyholderService:
    """Serves one committee member over a transport.

    Args:
        keyholder: the member.
        transport: a transport (manual acks recommended).
        state_path: JSON file of answered rounds (None: memory only).
        witness_grace_s: how long a request may wait for updates not seen yet.
        relay_idle_s: ask for a relay of missing updates only once no update
            arrived for this long (a member still catching up just waits).
        clock: seconds (monotonic), injected for tests.
        witness_batch: most witnessed updates made durable (and acknowledged)
            by one fsync.
        witness_sync_ms: a batch is synced at the latest this long after
            its first update arrived.
    """

    def __init__(
        self,
        keyholder: KeyHolder,
        transport: Transport,
        *,
        state_path: Path | None = None,
        witness_grace_s: float = 60.0,
        relay_idle_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        witness_batch: int = 64,
        witness_sync_ms: float = 5.0,
    ) -> None:
        """Create the service (reloading its witness log); :meth:`start` connects."""
        if witness_batch < 1 or witness_sync_ms < 0:
            raise ValueError("witness_batch must be >= 1 and witness_sync_ms >= 0")
        self.keyholder = keyholder
        self.transport = transport
        self.state_path = state_path
        self.topics = Topics(keyholder.federation)
        self._reassembler = Reassembler(max_payload_size=MAX_REQUEST_BYTES, max_pending=8)
        self._lock = threading.Lock()
        self.witness_grace_s = witness_grace_s
        self._clock = clock
        self._first_asked: dict[bytes, float] = {}
        self.deferred = 0
        self.relay_idle_s = relay_idle_s
        self._last_update = float("-inf")
        # requests waiting for updates (newest last; bounded), re-tried after relays
        self._waiting: dict[bytes, KeyholderRequest] = {}
        self._relay_reassembler = Reassembler(
            max_payload_size=keyholder.max_update_bytes, max_pending=16
        )
        self.gaps_sent = 0
        load_state(keyholder, state_path)
        self.witness_batch = witness_batch
        self.witness_sync_s = witness_sync_ms / 1000.0
        self._unacked: list[InboundMessage] = []  # stored, waiting for the log's fsync
        self._dirty = threading.Event()
        self._closing = threading.Event()
        self._flusher: threading.Thread | None = None
        self._approval_check: threading.Event | None = None
        self._pruned_through = -1
        self.witness_syncs = 0
        self.reloaded = 0
        self.witness_log: WitnessLog | None = None
        if state_path is not None:
            self.witness_log = WitnessLog(state_path.with_name(state_path.stem + "-witness.log"))
            self.reloaded = self._reload_witness(state_path.with_name(state_path.stem + "-witness"))
            keyholder.on_stored = self._persist_update

    def _reload_witness(self, old_folder: Path) -> int:
        """Feed the updates stored before a restart back to the witness (verified again).

        Also takes over the file-per-update folder of earlier versions
        (``{state}-witness/{device}/{round}.upd``): its updates go to the log,
        then the folder is deleted.
        """
        assert self.witness_log is not None
        reloaded = 0
        for device, round_id, payload in self.witness_log.records():
            try:
                update = EncryptedUpdate.from_bytes(payload, max_size=MAX_UPDATE_BYTES)
            except DecodeError:
                continue  # never trusted; dropped by the compaction below
            if (update.device_id, update.round_id) != (device, round_id):
                continue
            if self.keyholder.witness_update(update) == "stored":
                reloaded += 1
        if old_folder.is_dir():
            for path in sorted(old_folder.glob("*/*.upd")):
                try:
                    update = EncryptedUpdate.from_bytes(
                        path.read_bytes(), max_size=MAX_UPDATE_BYTES
                    )
                except (OSError, DecodeError):
                    continue
                if self.keyholder.witness_update(update) == "stored":
                    self.witness_log.append(update.device_id, update.round_id, path.read_bytes())
                    reloaded += 1
            self.witness_log.sync()
            shutil.rmtree(old_folder, ignore_errors=True)
        self._compact()
        return reloaded

    def _persist_update(self, update: EncryptedUpdate, payload: bytes) -> None:
        """Append a newly stored update to the log (durable at the next sync)."""
        assert self.witness_log is not None
        self.witness_log.append(update.device_id, update.round_id, payload)

    def _compact(self) -> None:
        """Rewrite the log with the updates the witness still holds."""
        if self.witness_log is None:
            return
        self.witness_log.rewrite(lambda d, r: self.keyholder.witnessed(d, r) is not None)
        self._pruned_through = max(self.keyholder.answered_rounds(), default=-1)

    def _prune(self) -> None:
        """Compact the log once a round was answered, or when it is mostly dead records."""
        if self.witness_log is None:
            return
        answered = max(self.keyholder.answered_rounds(), default=-1)
        live = self.keyholder.witnessed_count()
        if answered > self._pruned_through or self.witness_log.count > 2 * live + 1024:
            self._sync_witness()
            self._compact()

    def _sync_witness(self) -> None:
        """Make the appended updates durable, then acknowledge their broker messages."""
        if self.witness_log is not None and self.witness_log.unsynced:
            self.witness_log.sync()
            self.witness_syncs += 1
        pending, self._unacked = self._unacked, []
        for message in pending:
            message.ack()

    def flush_witness(self) -> None:
        """Sync the witness log and acknowledge what it holds now (also done in batches)."""
        with self._lock:
            self._sync_witness()

    def _flush_loop(self) -> None:
        while not self._closing.is_set():
            if not self._dirty.wait(0.5):
                continue
            self._closing.wait(self.witness_sync_s)  # let a batch gather
            with self._lock:
                self._dirty.clear()
                self._sync_witness()

    def start(self, *, connect_timeout: float | None = 30.0) -> None:
        """Subscribe, start the witness log's flusher and connect."""
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="witness-flush", daemon=True
            )
            self._flusher.start()
        if self._approval_check is None:  # ahead of the first updates (it witnesses them all)
            self._approval_check = check_approvals_in_background(
                self.keyholder.registry, name="approval-check"
            )
        self.transport.subscribe(self.topics.keyholder_request, self._on_message, qos=1)
        self.transport.subscribe(self.topics.updates_filter, self._on_update, qos=1)
        # rounds split over aggregator workers: updates/{shard}/{device}
        self.transport.subscribe(self.topics.sharded_updates_filter, self._on_update, qos=1)
        self.transport.subscribe(self.topics.keyholder_commit_filter, self._on_commit, qos=1)
        self.transport.subscribe(
            self.topics.keyholder_relay(self.keyholder.holder_id), self._on_relay, qos=1
        )
        self.transport.connect(timeout=connect_timeout)

    def _on_commit(self, message: InboundMessage) -> None:
        with self._lock:
            try:
                parsed = parse_topic(message.topic)
                commit = KeyholderCommit.from_bytes(message.payload, max_size=4096)
                if parsed is None or parsed.device_id != commit.holder_id:
                    raise DecodeError("commitment on another member's topic", reason="sender")
                if commit.holder_id != self.keyholder.holder_id:
                    result = self.keyholder.receive_commit(commit)
                    if result is not None:
                        self._send_result(result)
            except DecodeError as exc:
                log.warning("bad commitment message: %s", exc)
            finally:
                message.ack()

    def _on_relay(self, message: InboundMessage) -> None:
        with self._lock:
            try:
                chunk = Chunk.from_bytes(message.payload)
                if chunk.federation != self.keyholder.federation or chunk.stream != "update":
                    raise DecodeError("relay chunk of another stream", reason="stream")
                whole = self._relay_reassembler.add(chunk)
                if whole is not None:
                    outcome = self.keyholder.witness_relayed(chunk.sender, whole)
                    log.info(
                        "%s: relayed update of %s: %s",
                        self.keyholder.holder_id,
                        chunk.sender,
                        outcome,
                    )
                    if outcome == "stored":
                        self._sync_witness()  # durable before the relay is acknowledged
                        self._retry_waiting()
            except DecodeError as exc:
                log.warning("bad relay message: %s", exc)
            finally:
                message.ack()

    def _retry_waiting(self) -> None:
        """Answer every waiting request whose updates are now all witnessed."""
        for key, request in list(self._waiting.items()):
            if self.keyholder.missing(request) == 0:
                self._answer(request, key)

    def _on_update(self, message: InboundMessage) -> None:
        with self._lock:
            deferred = False
            try:
                outcome = self.keyholder.witness(message.topic, message.payload)
                if outcome == "stored" and self.witness_log is not None:
                    # acknowledged once the log holding it is fsynced (its batch)
                    self._unacked.append(message)
                    deferred = True
                    if len(self._unacked) >= self.witness_batch:
                        self._sync_witness()
                    else:
                        self._dirty.set()
                if outcome in ("stored", "partial"):
                    # new updates still arriving (a member catching up); duplicates
                    # (brokers redeliver, devices resend) do not count
                    self._last_update = self._clock()
                if outcome not in ("stored", "partial", "duplicate"):
                    seen = self.keyholder.counters.get(f"witness_{outcome}", 0)
                    if seen <= 3 or seen % 1000 == 0:  # bounded: a flood logs little
                        log.warning(
                            "%s: ignored a message on %s: %s (%d so far)",
                            self.keyholder.holder_id,
                            message.topic,
                            outcome,
                            seen,
                        )
            finally:
                if not deferred:
                    message.ack()

    def _on_message(self, message: InboundMessage) -> None:
        with self._lock:
            try:
                self._handle(message.payload)
            finally:
                message.ack()

    def _handle(self, payload: bytes) -> None:
        try:
            chunk = Chunk.from_bytes(payload)
            if chunk.sender != "aggregator" or chunk.federation != self.keyholder.federation:
                raise DecodeError("request chunk from an unexpected sender", reason="sender")
            whole = self._reassembler.add(chunk)
            if whole is None:
                return
            request = KeyholderRequest.from_bytes(whole, max_size=MAX_REQUEST_BYTES)
        except DecodeError as exc:
            log.warning("bad request message: %s", exc)
            return
        self._answer(request, digest(whole))

    def _answer(self, request: KeyholderRequest, key: bytes) -> None:
        answered = self.keyholder.answered_rounds()
        previous = answered.get(request.round_id)
        # A second, different sum for an answered round, or a request for a
        # round at or below the last one answered, is refused at once: its
        # updates were forgotten on purpose, so waiting for them is pointless.
        settled = (previous is not None and previous != request_digest(request)) or (
            previous is None and request.round_id <= max(answered, default=-1)
        )
        missing = 0 if settled else self.keyholder.missing(request)
        if missing:
            first = self._first_asked.setdefault(key, self._clock())
            if self._clock() - first < self.witness_grace_s:
                self.deferred += 1
                self._waiting.pop(key, None)
                self._waiting[key] = request
                while len(self._waiting) > 4:
                    self._waiting.pop(next(iter(self._waiting)))
                log.info(
                    "round %d: %d of the listed updates not seen yet; waiting for a re-ask",
                    request.round_id,
                    missing,
                )
                self._report_gap(request)
                return
        self._first_asked.pop(key, None)
        self._waiting.pop(key, None)
        out = self.keyholder.handle(request)
        save_state(self.keyholder, self.state_path)  # the commitment is durable first
        self._prune()
        if isinstance(out, KeyholderCommit):
            self._publish_commit(out)
            return
        if out.status == "ok":  # re-ask after release: our commitment may have been lost
            own = self.keyholder.own_commit(request.round_id)
            if own is not None:
                self._publish_commit(own)
        self._send_result(out)

    def _report_gap(self, request: KeyholderRequest) -> None:
        """Ask the aggregator to relay the updates this member never saw."""
        if self._clock() - self._last_update < self.relay_idle_s:
            return  # updates are still arriving: wait for the re-ask
        gap = self.keyholder.gap_notice(request)
        if gap is None:
            return
        try:
            self.transport.publish(
                self.topics.keyholder_gap(self.keyholder.holder_id), gap.to_bytes(), qos=1
            )
        except TransportError as exc:  # sent again on the next re-ask
            log.warning("publishing the gap notice failed: %s", exc)
            return
        self.gaps_sent += 1
        log.warning(
            "%s: round %d: asked for a relay of %d updates",
            self.keyholder.holder_id,
            request.round_id,
            len(gap.devices),
        )

    def _publish_commit(self, commit: KeyholderCommit) -> None:
        topic = self.topics.keyholder_commit(self.keyholder.holder_id)
        try:
            self.transport.publish(topic, commit.to_bytes(), qos=1)
        except TransportError as exc:  # re-published on the aggregator's re-ask
            log.warning("publishing the commitment failed: %s", exc)
        log.info(
            "%s: round %d: committed, waiting for %d members' commitments",
            self.keyholder.holder_id,
            commit.round_id,
            self.keyholder.commit_quorum,
        )

    def _send_result(self, result: KeyholderResult) -> None:
        self.publish(result.to_bytes(), round_id=result.round_id)
        log.info(
            "%s: round %d: %s (%d contributions)",
            self.keyholder.holder_id,
            result.round_id,
            result.status if result.status == "ok" else f"refused {result.reason}",
            result.count,
        )

    def publish(self, payload: bytes, *, round_id: int) -> None:
        """Send an encoded result, chunked to the broker's limit."""
        topic = self.topics.keyholder_result(self.keyholder.holder_id)
        size = max(self.transport.max_payload_size(topic), 4096)
        for piece in split_payload(
            payload,
            federation=self.keyholder.federation,
            stream="model",
            sender=self.keyholder.holder_id,
            round_id=round_id,
            max_message_size=size,
        ):
            try:
                self.transport.publish(topic, piece.to_bytes(), qos=1)
            except TransportError as exc:  # the aggregator re-asks after its retry delay
                log.warning("publishing the result failed: %s", exc)

    def close(self) -> None:
        """Sync and acknowledge the witnessed updates, close the log, disconnect."""
        self._closing.set()
        if self._approval_check is not None:
            self._approval_check.set()
        if self._flusher is not None:
            self._flusher.join(5)
        with self._lock:
            self._sync_witness()
            if self.witness_log is not None:
                self.witness_log.close()
        self.transport.close()
