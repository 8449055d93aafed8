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
    Receipt,
    RoundAnnouncement,
    WitnessGap,
    decode_message,
    digest,
    model_digest,
)
from edge_sdk.protocol.topics import ParsedTopic, Topics, parse_topic

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
    "ParsedTopic",
    "Reassembler",
    "Receipt",
    "RoundAnnouncement",
    "Topics",
    "WitnessGap",
    "decode_message",
    "digest",
    "model_digest",
    "parse_topic",
    "split_payload",
]
