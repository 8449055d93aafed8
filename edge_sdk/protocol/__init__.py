"""The edgefl wire protocol: messages, canonical encoding, chunking, topics.

No I/O here: the same code is driven by MQTT in production and by direct
calls in tests. See docs/protocol.md for the normative description.
"""

from edge_sdk.protocol._codec import SCHEMA_VERSION, SUPPORTED_VERSIONS, Message
from edge_sdk.protocol.chunking import DEFAULT_MAX_MESSAGE_SIZE, Reassembler, split_payload
from edge_sdk.protocol.messages import (
    Chunk,
    ContributorProof,
    DeviceStatus,
    EncryptedUpdate,
    GlobalModel,
    KeyholderCommit,
    KeyholderRequest,
    KeyholderResult,
    PartialSum,
    Receipt,
    RoundAnnouncement,
    ShardControl,
    WitnessGap,
    decode_message,
    digest,
    model_digest,
)
from edge_sdk.protocol.topics import MAX_SHARDS, ParsedTopic, Topics, parse_topic, shard_of

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "SCHEMA_VERSION",
    "SUPPORTED_VERSIONS",
    "Chunk",
    "ContributorProof",
    "DeviceStatus",
    "EncryptedUpdate",
    "GlobalModel",
    "KeyholderRequest",
    "KeyholderCommit",
    "KeyholderResult",
    "Message",
    "MAX_SHARDS",
    "ParsedTopic",
    "PartialSum",
    "Reassembler",
    "Receipt",
    "RoundAnnouncement",
    "ShardControl",
    "Topics",
    "WitnessGap",
    "decode_message",
    "digest",
    "model_digest",
    "parse_topic",
    "shard_of",
    "split_payload",
]
