"""The key holder as its own service over MQTT (the recommended two-party deployment).

Requests arrive on ``keyholder/request`` and results leave on
``keyholder/result``, both chunked: protocol v1 has no chunk stream of its
own for them, so requests travel as ``stream="update"`` chunks with sender
``aggregator`` and results as ``stream="model"`` chunks with sender
``keyholder``; the topic tells them apart from device updates and models.

The rounds it answered (request digests, never plaintexts) are kept in a
small JSON state file, so a restarted key holder still refuses a second,
different sum for a round it already decrypted.

Witness mode (the default): the key holder also subscribes to the devices'
``updates/+`` topics (read-only in the generated ACL) and keeps, in memory,
the ciphertext blobs it saw for recent rounds, keyed by their SHA-256. A
request is then decrypted only if the encrypted sum equals the product of
exactly the listed contributors' blobs, each matching the digest its device
signed. Without this, a dishonest aggregator could list ``min_clients``
genuine proofs and submit ONE device's ciphertext as "the sum" to learn that
device's update. A blob the key holder has not seen yet gets a grace period
(the aggregator re-asks); after it the request is refused, which costs the
round, never privacy.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from aggregator.keyholder import KeyHolder
from edge_sdk._fs import atomic_write
from edge_sdk.errors import DecodeError
from edge_sdk.protocol import (
    Chunk,
    EncryptedUpdate,
    KeyholderRequest,
    Reassembler,
    Topics,
    digest,
    split_payload,
)
from edge_sdk.transport import InboundMessage, Transport, TransportError

__all__ = ["KeyholderService"]

log = logging.getLogger("edgefl.keyholder")


class KeyholderService:
    """Serves decryption requests over a transport.

    Args:
        keyholder: the key holder.
        transport: a transport (manual acks recommended).
        state_path: JSON file of answered rounds (None: memory only).
        witness: verify every sum against the devices' own ciphertexts, seen
            on ``updates/+`` (see the module docstring). Default on.
        witness_grace_s: how long a request may wait for blobs not yet seen.
        witness_rounds: rounds of blobs kept in memory.
        clock: seconds (monotonic), injected for tests.
    """

    def __init__(
        self,
        keyholder: KeyHolder,
        transport: Transport,
        *,
        state_path: Path | None = None,
        witness: bool = True,
        witness_grace_s: float = 60.0,
        witness_rounds: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the service; :meth:`start` connects."""
        self.keyholder = keyholder
        self.transport = transport
        self.state_path = state_path
        self.topics = Topics(keyholder.federation)
        self._reassembler = Reassembler(max_payload_size=1 << 30, max_pending=8)
        self._lock = threading.Lock()
        self.witness = witness
        self.witness_grace_s = witness_grace_s
        self.witness_rounds = witness_rounds
        self._clock = clock
        self._update_reassembler = Reassembler(max_payload_size=256 << 20, max_pending=4096)
        # round -> ciphertext digest -> blob (only ciphertexts; never a plaintext)
        self._blobs: OrderedDict[int, dict[bytes, bytes]] = OrderedDict()
        self._first_asked: dict[bytes, float] = {}
        self.deferred = 0
        if state_path is not None and state_path.exists():
            doc = json.loads(state_path.read_text(encoding="utf-8"))
            keyholder.restore_answered({int(k): bytes.fromhex(v) for k, v in doc.items()})

    def start(self, *, connect_timeout: float | None = 30.0) -> None:
        """Subscribe and connect."""
        self.transport.subscribe(self.topics.keyholder_request, self._on_message, qos=1)
        if self.witness:
            self.transport.subscribe(self.topics.updates_filter, self._on_update, qos=1)
        self.transport.connect(timeout=connect_timeout)

    def _on_update(self, message: InboundMessage) -> None:
        with self._lock:
            try:
                self._witness(message.payload)
            finally:
                message.ack()

    def _witness(self, payload: bytes) -> None:
        try:
            chunk = Chunk.from_bytes(payload)
            if chunk.stream != "update" or chunk.federation != self.keyholder.federation:
                return
            whole = self._update_reassembler.add(chunk)
            if whole is None:
                return
            update = EncryptedUpdate.from_bytes(whole)
        except DecodeError:
            return  # the aggregator rejects and counts bad updates; nothing to keep
        newest = max(self._blobs, default=-1)
        if update.round_id < newest - self.witness_rounds:
            return
        self._blobs.setdefault(update.round_id, {})[update.ciphertext_digest] = update.ciphertexts
        while len(self._blobs) > self.witness_rounds:
            self._blobs.popitem(last=False)

    def _witnessed(self, request: KeyholderRequest) -> tuple[dict[str, bytes], bool]:
        """Blobs by device id for the request's proofs, and whether all were seen."""
        seen = self._blobs.get(request.round_id, {})
        found: dict[str, bytes] = {}
        try:
            proofs = request.proofs()
        except DecodeError:
            return found, True  # the key holder's own checks refuse it
        for proof in proofs:
            blob = seen.get(proof.ciphertext_digest)
            if blob is not None:
                found[proof.device_id] = blob
        return found, len(found) == len(proofs)

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
            request = KeyholderRequest.from_bytes(whole)
        except DecodeError as exc:
            log.warning("bad request message: %s", exc)
            return
        ciphertexts: dict[str, bytes] | None = None
        if self.witness:
            ciphertexts, complete = self._witnessed(request)
            key = digest(whole)
            first = self._first_asked.setdefault(key, self._clock())
            if not complete and self._clock() - first < self.witness_grace_s:
                self.deferred += 1
                log.info(
                    "round %d: %d of the listed updates not seen yet; waiting for a re-ask",
                    request.round_id,
                    len(request.proofs()) - len(ciphertexts),
                )
                return
            self._first_asked.pop(key, None)
        result = self.keyholder.handle(request, ciphertexts=ciphertexts)
        self._save_state()
        size = max(self.transport.max_payload_size(self.topics.keyholder_result), 4096)
        for piece in split_payload(
            result.to_bytes(),
            federation=result.federation,
            stream="model",
            sender="keyholder",
            round_id=result.round_id,
            max_message_size=size,
        ):
            try:
                self.transport.publish(self.topics.keyholder_result, piece.to_bytes(), qos=1)
            except TransportError as exc:  # the aggregator re-asks after its retry delay
                log.warning("publishing the result failed: %s", exc)
        log.info("round %d: %s (%d contributions)", result.round_id, result.status, result.count)

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        doc = {str(k): v.hex() for k, v in self.keyholder.answered_rounds().items()}
        atomic_write(self.state_path, json.dumps(doc).encode(), mode=0o600)

    def close(self) -> None:
        """Disconnect."""
        self.transport.close()
