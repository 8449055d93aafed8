"""MQTT topics of a federation: ``edgefl/v1/{federation}/...``.

| topic | direction | retained | payload |
|---|---|---|---|
| ``round`` | aggregator -> devices | yes | RoundAnnouncement |
| ``model/{i}`` | aggregator -> devices | yes | Chunk i of the GlobalModel |
| ``updates/{device}`` | device -> aggregator | no | Chunks of an EncryptedUpdate |
| ``updates/{shard}/{device}`` | device -> worker | no | the same, in a round of ``shards`` > 1 |
| ``ack/{device}`` | aggregator -> device | no | Receipt |
| ``status/{device}`` | device -> aggregator | yes | DeviceStatus (last will: offline) |
| ``keyholder/request`` | aggregator -> key holder | no | KeyholderRequest (chunked if large) |
| ``keyholder/result/{holder}`` | committee member -> aggregator | no | KeyholderResult (chunked) |
| ``keyholder/commit/{holder}`` | committee member -> members | no | KeyholderCommit |
| ``keyholder/gap/{holder}`` | committee member -> aggregator | no | WitnessGap |
| ``keyholder/relay/{holder}`` | aggregator -> that member | no | Chunks of EncryptedUpdates |
| ``aggregator/control`` | aggregator root -> workers | yes | ShardControl |
| ``aggregator/partial/{worker}`` | aggregator worker -> root | no | PartialSum (chunked) |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edge_sdk.ids import ID_PATTERN

__all__ = ["MAX_SHARDS", "PREFIX", "ParsedTopic", "Topics", "parse_topic", "shard_of"]

#: Most aggregator workers (shards) a round can be split over.
MAX_SHARDS = 256


def shard_of(device_id: str, shards: int) -> int:
    """The shard (aggregator worker) that takes ``device_id``'s updates, of ``shards``.

    A fixed function of the device id, the same for the device, every worker
    and the root: SHA-256 of ``"edgefl-shard" NUL device_id``, its first 8
    bytes big-endian, modulo ``shards``.
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be in 1..{MAX_SHARDS}, got {shards}")
    h = hashlib.sha256(b"edgefl-shard\x00" + device_id.encode()).digest()
    return int.from_bytes(h[:8], "big") % shards


PREFIX = "edgefl/v1"
_NAME = ID_PATTERN


def _check_name(what: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} must match [A-Za-z0-9_-]{{1,64}}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one federation."""

    federation: str

    def __post_init__(self) -> None:
        _check_name("federation", self.federation)

    @property
    def base(self) -> str:
        """``edgefl/v1/{federation}``."""
        return f"{PREFIX}/{self.federation}"

    @property
    def round(self) -> str:
        """Retained round announcement."""
        return f"{self.base}/round"

    def model(self, index: int) -> str:
        """Retained chunk ``index`` of the current global model."""
        if index < 0:
            raise ValueError(f"model chunk index must be >= 0, got {index}")
        return f"{self.base}/model/{index}"

    @property
    def model_filter(self) -> str:
        """Subscription filter for every model chunk."""
        return f"{self.base}/model/+"

    def updates(self, device_id: str) -> str:
        """A device's update topic."""
        return f"{self.base}/updates/{_check_name('device_id', device_id)}"

    @property
    def updates_filter(self) -> str:
        """Subscription filter for every device's updates (unsharded rounds)."""
        return f"{self.base}/updates/+"

    def round_updates(self, device_id: str, shards: int) -> str:
        """Where a device publishes its update for a round announcing ``shards``."""
        if shards <= 1:
            return self.updates(device_id)
        shard = shard_of(_check_name("device_id", device_id), shards)
        return f"{self.base}/updates/{shard}/{device_id}"

    def shard_updates_filter(self, shard: int) -> str:
        """Subscription filter for the updates of one shard (one aggregator worker)."""
        if not 0 <= shard < MAX_SHARDS:
            raise ValueError(f"shard must be in 0..{MAX_SHARDS - 1}, got {shard}")
        return f"{self.base}/updates/{shard}/+"

    @property
    def sharded_updates_filter(self) -> str:
        """Subscription filter for every shard's updates (committee members)."""
        return f"{self.base}/updates/+/+"

    @property
    def shard_control(self) -> str:
        """Retained: the round the root has open and whether it is sealed."""
        return f"{self.base}/aggregator/control"

    def partial(self, worker_id: str) -> str:
        """One aggregator worker's partial sums to the root."""
        return f"{self.base}/aggregator/partial/{_check_name('worker_id', worker_id)}"

    @property
    def partial_filter(self) -> str:
        """Subscription filter for every worker's partial sums."""
        return f"{self.base}/aggregator/partial/+"

    def ack(self, device_id: str) -> str:
        """A device's receipt topic."""
        return f"{self.base}/ack/{_check_name('device_id', device_id)}"

    def status(self, device_id: str) -> str:
        """A device's status topic."""
        return f"{self.base}/status/{_check_name('device_id', device_id)}"

    @property
    def status_filter(self) -> str:
        """Subscription filter for every device's status."""
        return f"{self.base}/status/+"

    @property
    def keyholder_request(self) -> str:
        """Aggregator to key holder."""
        return f"{self.base}/keyholder/request"

    def keyholder_result(self, holder_id: str) -> str:
        """One committee member's results to the aggregator."""
        return f"{self.base}/keyholder/result/{_check_name('holder_id', holder_id)}"

    def keyholder_commit(self, holder_id: str) -> str:
        """One committee member's commitments (the request digest it answers per round)."""
        return f"{self.base}/keyholder/commit/{_check_name('holder_id', holder_id)}"

    @property
    def keyholder_commit_filter(self) -> str:
        """Subscription filter for every member's commitments."""
        return f"{self.base}/keyholder/commit/+"

    def keyholder_gap(self, holder_id: str) -> str:
        """One committee member's witness-gap notices (updates it never saw)."""
        return f"{self.base}/keyholder/gap/{_check_name('holder_id', holder_id)}"

    @property
    def keyholder_gap_filter(self) -> str:
        """Subscription filter for every member's witness-gap notices."""
        return f"{self.base}/keyholder/gap/+"

    def keyholder_relay(self, holder_id: str) -> str:
        """Devices' signed updates relayed to one member that missed them."""
        return f"{self.base}/keyholder/relay/{_check_name('holder_id', holder_id)}"

    @property
    def keyholder_result_filter(self) -> str:
        """Subscription filter for every committee member's results."""
        return f"{self.base}/keyholder/result/+"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic taken apart: its federation, kind and (for per-device topics) device id."""

    federation: str
    kind: str
    device_id: str | None = None
    index: int | None = None  # a model chunk's index, or the shard of a sharded update


def parse_topic(topic: str) -> ParsedTopic | None:
    """Parse an edgefl topic; None when it is not one."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX or not _NAME.fullmatch(parts[2]):
        return None
    federation, rest = parts[2], parts[3:]
    if rest == ["round"]:
        return ParsedTopic(federation, "round")
    if len(rest) == 2 and rest[0] == "model" and rest[1].isdigit() and len(rest[1]) <= 6:
        return ParsedTopic(federation, "model", index=int(rest[1]))
    if len(rest) == 2 and rest[0] in ("updates", "ack", "status") and _NAME.fullmatch(rest[1]):
        return ParsedTopic(federation, rest[0], device_id=rest[1])
    if (
        len(rest) == 3
        and rest[0] == "updates"
        and rest[1].isascii()
        and rest[1].isdigit()
        and rest[1] == str(int(rest[1]))
        and int(rest[1]) < MAX_SHARDS
        and _NAME.fullmatch(rest[2])
    ):
        return ParsedTopic(federation, "updates", device_id=rest[2], index=int(rest[1]))
    if rest == ["aggregator", "control"]:
        return ParsedTopic(federation, "aggregator/control")
    if len(rest) == 3 and rest[:2] == ["aggregator", "partial"] and _NAME.fullmatch(rest[2]):
        return ParsedTopic(federation, "aggregator/partial", device_id=rest[2])
    if rest == ["keyholder", "request"]:
        return ParsedTopic(federation, "keyholder/request")
    if len(rest) == 3 and rest[:2] == ["keyholder", "result"] and _NAME.fullmatch(rest[2]):
        return ParsedTopic(federation, "keyholder/result", device_id=rest[2])
    if (
        len(rest) == 3
        and rest[0] == "keyholder"
        and rest[1] in ("commit", "gap", "relay")
        and _NAME.fullmatch(rest[2])
    ):
        return ParsedTopic(federation, f"keyholder/{rest[1]}", device_id=rest[2])
    return None
