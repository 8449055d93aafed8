"""The one update-intake path (aggregator.intake), used by the round machine and the witness."""

from __future__ import annotations

import os

from aggregator.intake import UpdateIntake
from edge_sdk.protocol import Topics, split_payload
from edge_sdk.protocol.chunking import CHUNK_OVERHEAD

FED = "fed"
TOPICS = Topics(FED)


def _chunks(sender: str, payload: bytes, *, stream: str = "update", fed: str = FED) -> list[bytes]:
    pieces = split_payload(
        payload,
        federation=fed,
        stream=stream,
        sender=sender,
        round_id=1,
        max_message_size=CHUNK_OVERHEAD + 1024,
    )
    return [c.to_bytes() for c in pieces]


def test_one_device_cannot_evict_another_devices_half_received_update() -> None:
    intake = UpdateIntake(FED, max_update_bytes=1 << 16)
    victim = _chunks("dev-a", os.urandom(5000))
    assert intake.add(TOPICS.updates("dev-a"), victim[0]).reason == "partial"
    for _ in range(50):  # dev-b starts many different updates and finishes none
        flood = _chunks("dev-b", os.urandom(5000))
        intake.add(TOPICS.updates("dev-b"), flood[0])
    assert set(intake.pending_bytes()) == {"dev-a", "dev-b"}
    assert len(intake._per_device["dev-b"]) == intake.max_pending  # its own bound
    outcomes = [intake.add(TOPICS.updates("dev-a"), c).reason for c in victim[1:]]
    # the payload is random bytes, not an update: it reassembles, then fails to decode
    assert outcomes[:-1] == ["partial"] * (len(victim) - 2)
    assert outcomes[-1].startswith("decode_")
    assert "dev-a" not in intake.pending_bytes()  # nothing kept after completion


def test_topic_stream_federation_and_sender_rules() -> None:
    intake = UpdateIntake(FED, max_update_bytes=1 << 16)
    one = _chunks("dev-a", b"x" * 10)[0]
    assert intake.add("edgefl/other/updates/dev-a", one).reason == "topic"
    assert intake.add(TOPICS.updates("dev-b"), one).reason == "topic_mismatch"
    assert intake.add(TOPICS.updates("dev-a"), b"\x00garbage").reason.startswith("decode_")
    stream = _chunks("dev-a", b"x" * 10, stream="model")[0]
    assert intake.add(TOPICS.updates("dev-a"), stream).reason == "wrong_stream"
    foreign = _chunks("dev-a", b"x" * 10, fed="other")[0]
    assert intake.add(TOPICS.updates("dev-a"), foreign).reason == "federation"


def test_oversized_payloads_and_too_many_devices_are_bounded() -> None:
    intake = UpdateIntake(FED, max_update_bytes=2048, max_devices=3)
    big = _chunks("dev-a", os.urandom(4096))[0]
    assert intake.add(TOPICS.updates("dev-a"), big).reason == "chunk_too_large"
    for d in ("d1", "d2", "d3", "d4"):
        intake.add(TOPICS.updates(d), _chunks(d, os.urandom(1500))[0])
    assert set(intake.pending_bytes()) == {"d2", "d3", "d4"} and intake.evicted_devices == 1
    assert intake.pending() == 3


def test_admit_gates_before_anything_is_buffered() -> None:
    intake = UpdateIntake(
        FED, max_update_bytes=1 << 16, admit=lambda d: None if d == "ok" else "unknown_device"
    )
    chunk = _chunks("nope", os.urandom(3000))[0]
    assert intake.add(TOPICS.updates("nope"), chunk).reason == "unknown_device"
    assert intake.pending() == 0
