"""Splitting large payloads into Chunk messages and reassembling them.

Some hosted brokers cap messages at 128 KiB and paho does not honour a
broker's maximum packet size, so updates and models always travel as
:class:`~edge_sdk.protocol.messages.Chunk` messages (a small one as a single
chunk). Chunks are reassembled in any order, keyed by (stream, sender,
round, payload digest); the result is accepted only when its size and
SHA-256 match. Memory is bounded: a payload larger than ``max_payload_size``
or more than ``max_pending`` incomplete payloads are refused or evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from edge_sdk.errors import DecodeError
from edge_sdk.protocol.limits import MAX_UPDATE_BYTES
from edge_sdk.protocol.messages import MAX_CHUNKS, Chunk, digest

__all__ = ["CHUNK_OVERHEAD", "DEFAULT_MAX_MESSAGE_SIZE", "Reassembler", "split_payload"]

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024
# Chunk fields besides data (<= ~330 bytes with 64-char names), the MQTT
# fixed/variable header and topic (<= ~200 bytes), with margin.
CHUNK_OVERHEAD = 1024


def split_payload(
    payload: bytes,
    *,
    federation: str,
    stream: str,
    sender: str,
    round_id: int,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> list[Chunk]:
    """Split ``payload`` into chunks whose encodings fit ``max_message_size``.

    Raises:
        ValueError: the size limit is too small, or the payload would need
            more than the maximum number of chunks.
    """
    if max_message_size <= CHUNK_OVERHEAD + 64:
        raise ValueError(f"max_message_size must exceed {CHUNK_OVERHEAD + 64} bytes")
    if not payload:
        raise ValueError("cannot chunk an empty payload")
    room = max_message_size - CHUNK_OVERHEAD
    total = -(-len(payload) // room)
    if total > MAX_CHUNKS:
        raise ValueError(f"payload of {len(payload)} bytes needs {total} > {MAX_CHUNKS} chunks")
    payload_digest = digest(payload)
    return [
        Chunk(
            federation=federation,
            stream=stream,
            sender=sender,
            round_id=round_id,
            payload_digest=payload_digest,
            payload_size=len(payload),
            index=i,
            total=total,
            data=payload[i * room : (i + 1) * room],
        )
        for i in range(total)
    ]


@dataclass(slots=True)
class _Pending:
    total: int
    size: int
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0


class Reassembler:
    """Collects chunks and yields whole, digest-checked payloads.

    Args:
        max_payload_size: refuse payloads declared larger than this.
        max_pending: incomplete payloads kept at once; the oldest is evicted.
    """

    def __init__(self, *, max_payload_size: int = MAX_UPDATE_BYTES, max_pending: int = 1024):
        self.max_payload_size = max_payload_size
        self.max_pending = max_pending
        self._pending: OrderedDict[tuple[str, str, int, bytes], _Pending] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def pending_bytes(self) -> int:
        """Bytes held in incomplete payloads."""
        return sum(p.received_bytes for p in self._pending.values())

    def add(self, chunk: Chunk) -> bytes | None:
        """Add a chunk; return the whole payload when it completes it.

        A chunk seen before with the same bytes is ignored (redelivery).

        Raises:
            DecodeError: the chunk contradicts earlier ones of its payload,
                the payload is too large, or the reassembled bytes do not
                match the declared size and digest.
        """
        if chunk.payload_size > self.max_payload_size:
            raise DecodeError(
                f"chunked payload of {chunk.payload_size} bytes exceeds the "
                f"{self.max_payload_size}-byte limit",
                reason="too_large",
            )
        if chunk.total > chunk.payload_size:
            raise DecodeError("more chunks than payload bytes", reason="chunk_inconsistent")
        key = (chunk.stream, chunk.sender, chunk.round_id, chunk.payload_digest)
        pending = self._pending.get(key)
        if pending is None:
            pending = _Pending(total=chunk.total, size=chunk.payload_size)
            self._pending[key] = pending
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self.evicted += 1
        elif pending.total != chunk.total or pending.size != chunk.payload_size:
            raise DecodeError(
                "chunk disagrees with earlier chunks on total or size", reason="chunk_inconsistent"
            )
        previous = pending.parts.get(chunk.index)
        if previous is not None:
            if previous != chunk.data:
                raise DecodeError(
                    f"chunk {chunk.index} arrived twice with different data",
                    reason="chunk_inconsistent",
                )
            return None
        if pending.received_bytes + len(chunk.data) > pending.size:
            self._pending.pop(key, None)
            raise DecodeError(
                "chunks exceed the declared payload size", reason="chunk_inconsistent"
            )
        pending.parts[chunk.index] = chunk.data
        pending.received_bytes += len(chunk.data)
        if len(pending.parts) < pending.total:
            return None
        del self._pending[key]
        payload = b"".join(pending.parts[i] for i in range(pending.total))
        if len(payload) != pending.size or digest(payload) != chunk.payload_digest:
            raise DecodeError(
                "reassembled payload does not match its size and digest", reason="chunk_digest"
            )
        return payload

    def discard(self, *, stream: str | None = None, sender: str | None = None) -> int:
        """Drop incomplete payloads of a stream and/or sender; return how many."""
        doomed = [
            k
            for k in self._pending
            if (stream is None or k[0] == stream) and (sender is None or k[1] == sender)
        ]
        for k in doomed:
            del self._pending[k]
        return len(doomed)
