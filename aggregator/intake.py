"""The one update-intake path: topic, chunk, per-device reassembly, decode.

Every party that receives device updates (the round machine, each
committee member's witness, the simulator through them) takes them through
:class:`UpdateIntake`, so the rules are written once:

* the topic must be ``edgefl/{federation}/updates/{device}``;
* a chunk must decode, be of the ``update`` stream and of this federation,
  and be sent by the device whose topic it is on;
* chunks reassemble per device (at most ``max_pending`` incomplete updates
  each), so no device can evict another's half-received update; payloads
  are bounded by ``max_update_bytes`` before any byte is buffered;
* the whole payload must decode as an :class:`EncryptedUpdate` naming the
  same device.

What is checked after this (signatures, rounds, keys, binding proofs)
belongs to the receiver. No I/O here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edge_sdk.errors import DecodeError
from edge_sdk.protocol import Chunk, EncryptedUpdate, Reassembler, parse_topic, shard_of

__all__ = ["Intake", "UpdateIntake"]


@dataclass(frozen=True, slots=True)
class Intake:
    """What one message on an update topic gave.

    ``reason`` is ``""`` with a whole ``update``, ``"partial"`` for a chunk of
    an update still incomplete, else why the message was refused:
    ``topic``, ``federation``, ``wrong_stream``, ``topic_mismatch``,
    ``decode_<why>``, ``chunk_<why>``, or what ``admit`` returned.
    """

    device: str | None
    round_id: int | None
    update: EncryptedUpdate | None
    reason: str
    detail: str = ""
    payload: bytes = b""  # the whole update's bytes, as received


class UpdateIntake:
    """Device updates from broker messages (see the module docstring).

    Args:
        federation: the federation whose topics and chunks are accepted.
        max_update_bytes: the largest update payload reassembled.
        max_pending: incomplete updates kept per device.
        max_devices: devices with reassembly state at once; the least
            recently seen device's partial state is dropped beyond it.
        admit: optional gate run on the topic's device before any chunk
            is buffered; returns ``None`` to admit or a refusal reason.
    """

    def __init__(
        self,
        federation: str,
        *,
        max_update_bytes: int,
        max_pending: int = 2,
        max_devices: int = 1 << 16,
        admit: Callable[[str], str | None] | None = None,
        shard: tuple[int, int] | None = None,
        any_shard: bool = False,
    ) -> None:
        self.federation = federation
        #: (shard, shards) of an aggregator worker: it takes only
        #: ``updates/{shard}/{device}`` of devices whose shard that is; None:
        #: a single aggregator, it takes only ``updates/{device}``.
        self.shard = shard
        #: a committee member: takes both topic forms, on any shard (it only
        #: witnesses; which worker counts an update is not its concern).
        self.any_shard = any_shard
        self.max_update_bytes = max_update_bytes
        self.max_pending = max_pending
        self.max_devices = max_devices
        self.admit = admit
        self._per_device: OrderedDict[str, Reassembler] = OrderedDict()
        self.evicted_devices = 0

    def pending(self) -> int:
        """Incomplete updates held."""
        return sum(len(r) for r in self._per_device.values())

    def pending_bytes(self) -> dict[str, int]:
        """Bytes held in incomplete updates, per device (only devices holding some)."""
        return {d: r.pending_bytes() for d, r in self._per_device.items() if len(r)}

    def discard(self) -> None:
        """Drop every incomplete update (a new round makes them useless)."""
        self._per_device.clear()

    def add(self, topic: str, payload: bytes) -> Intake:
        """Take one message from an update topic."""
        parsed = parse_topic(topic)
        if (
            parsed is None
            or parsed.federation != self.federation
            or parsed.kind != "updates"
            or parsed.device_id is None
        ):
            return Intake(None, None, None, "topic", topic[:128])
        device = parsed.device_id
        if self.any_shard:
            pass
        elif self.shard is None:
            if parsed.index is not None:
                return Intake(device, None, None, "wrong_shard", "sharded topic, unsharded round")
        elif parsed.index != self.shard[0] or shard_of(device, self.shard[1]) != self.shard[0]:
            return Intake(device, None, None, "wrong_shard", f"topic shard {parsed.index}")
        if self.admit is not None and (refused := self.admit(device)) is not None:
            return Intake(device, None, None, refused)
        try:
            chunk = Chunk.from_bytes(payload)
        except DecodeError as exc:
            return Intake(device, None, None, f"decode_{exc.reason}", str(exc))
        if chunk.federation != self.federation:
            return Intake(device, chunk.round_id, None, "federation")
        if chunk.stream != "update":
            return Intake(device, chunk.round_id, None, "wrong_stream")
        if chunk.sender != device:
            return Intake(device, chunk.round_id, None, "topic_mismatch", "chunk sender")
        reassembler = self._per_device.get(device)
        if reassembler is None:
            reassembler = Reassembler(
                max_payload_size=self.max_update_bytes, max_pending=self.max_pending
            )
            self._per_device[device] = reassembler
            while len(self._per_device) > self.max_devices:
                self._per_device.popitem(last=False)
                self.evicted_devices += 1
        else:
            self._per_device.move_to_end(device)
        try:
            whole = reassembler.add(chunk)
        except DecodeError as exc:
            if not len(reassembler):
                del self._per_device[device]  # refused before anything was held
            return Intake(device, chunk.round_id, None, f"chunk_{exc.reason}", str(exc))
        if whole is None:
            return Intake(device, chunk.round_id, None, "partial")
        if not len(reassembler):
            del self._per_device[device]  # nothing pending: no state kept for it
        try:
            update = EncryptedUpdate.from_bytes(whole, max_size=self.max_update_bytes)
        except DecodeError as exc:
            return Intake(device, chunk.round_id, None, f"decode_{exc.reason}", str(exc))
        if update.device_id != device:
            # A replay of another device's update onto this device's topic.
            return Intake(device, update.round_id, update, "topic_mismatch", update.device_id)
        return Intake(device, update.round_id, update, "", payload=whole)
