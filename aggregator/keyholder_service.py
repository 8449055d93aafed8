"""The key holder as its own service over MQTT (the recommended two-party deployment).

Requests arrive on ``keyholder/request`` and results leave on
``keyholder/result``, both chunked: protocol v1 has no chunk stream of its
own for them, so requests travel as ``stream="update"`` chunks with sender
``aggregator`` and results as ``stream="model"`` chunks with sender
``keyholder``; the topic tells them apart from device updates and models.

The rounds it answered (request digests, never plaintexts) are kept in a
small JSON state file, so a restarted key holder still refuses a second,
different sum for a round it already decrypted.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from aggregator.keyholder import KeyHolder
from edge_sdk._fs import atomic_write
from edge_sdk.errors import DecodeError
from edge_sdk.protocol import Chunk, KeyholderRequest, Reassembler, Topics, split_payload
from edge_sdk.transport import InboundMessage, Transport, TransportError

__all__ = ["KeyholderService"]

log = logging.getLogger("edgefl.keyholder")


class KeyholderService:
    """Serves decryption requests over a transport.

    Args:
        keyholder: the key holder.
        transport: a transport (manual acks recommended).
        state_path: JSON file of answered rounds (None: memory only).
    """

    def __init__(
        self, keyholder: KeyHolder, transport: Transport, *, state_path: Path | None = None
    ) -> None:
        """Create the service; :meth:`start` connects."""
        self.keyholder = keyholder
        self.transport = transport
        self.state_path = state_path
        self.topics = Topics(keyholder.federation)
        self._reassembler = Reassembler(max_payload_size=1 << 30, max_pending=8)
        self._lock = threading.Lock()
        if state_path is not None and state_path.exists():
            doc = json.loads(state_path.read_text(encoding="utf-8"))
            keyholder.restore_answered({int(k): bytes.fromhex(v) for k, v in doc.items()})

    def start(self, *, connect_timeout: float | None = 30.0) -> None:
        """Subscribe and connect."""
        self.transport.subscribe(self.topics.keyholder_request, self._on_message, qos=1)
        self.transport.connect(timeout=connect_timeout)

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
        result = self.keyholder.handle(request)
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
