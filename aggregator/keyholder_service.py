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
round. Every update it stores in its witness is written (atomically, fsync)
to ``{state}-witness/{device}/{round}.upd`` BEFORE the broker message is
acknowledged, and reloaded (and re-verified) at start: a member killed
mid-round loses none of the updates it had seen. Files of answered rounds
and beyond a device's witness slots are deleted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.committee import request_digest
from aggregator.keyholder import KeyHolder
from edge_sdk._fs import atomic_write
from edge_sdk.errors import DecodeError
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
    ) -> None:
        """Create the service; :meth:`start` connects."""
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
        self.witness_dir = (
            None if state_path is None else state_path.with_name(state_path.stem + "-witness")
        )
        if self.witness_dir is not None:
            self.reloaded = self._reload_witness()
            keyholder.on_stored = self._persist_update

    def _reload_witness(self) -> int:
        """Feed the updates stored before a restart back to the witness."""
        assert self.witness_dir is not None
        reloaded = 0
        for path in sorted(self.witness_dir.glob("*/*.upd")):
            try:
                update = EncryptedUpdate.from_bytes(path.read_bytes(), max_size=MAX_UPDATE_BYTES)
            except (OSError, DecodeError):
                path.unlink(missing_ok=True)  # a torn or foreign file: never trusted
                continue
            if self.keyholder.witness_update(update) == "stored":
                reloaded += 1
            else:
                path.unlink(missing_ok=True)
        self._prune()
        return reloaded

    def _persist_update(self, update: EncryptedUpdate, payload: bytes) -> None:
        assert self.witness_dir is not None
        folder = self.witness_dir / update.device_id
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(folder / f"{update.round_id}.upd", payload, mode=0o600)
        kept = sorted((int(p.stem), p) for p in folder.glob("*.upd") if p.stem.isdigit())
        for _, old in kept[: max(0, len(kept) - self.keyholder.witness_rounds)]:
            old.unlink(missing_ok=True)

    def _prune(self) -> None:
        """Delete stored updates of rounds already answered."""
        if self.witness_dir is None or not self.witness_dir.exists():
            return
        answered = max(self.keyholder.answered_rounds(), default=-1)
        for path in self.witness_dir.glob("*/*.upd"):
            if not path.stem.isdigit() or int(path.stem) <= answered:
                path.unlink(missing_ok=True)

    def start(self, *, connect_timeout: float | None = 30.0) -> None:
        """Subscribe and connect."""
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
            try:
                outcome = self.keyholder.witness(message.topic, message.payload)
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
        """Disconnect."""
        self.transport.close()
