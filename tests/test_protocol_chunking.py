"""Chunking, reassembly in any order, topics, and device identity."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError, DecodeError, InvalidSignatureError, KeyFileError
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.protocol import Chunk, Reassembler, Topics, parse_topic, split_payload
from edge_sdk.protocol.chunking import CHUNK_OVERHEAD


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=20_000), st.integers(1100, 5000), st.randoms())
def test_chunks_reassemble_in_any_order(payload: bytes, limit: int, rnd: random.Random) -> None:
    chunks = split_payload(
        payload, federation="f", stream="update", sender="d1", round_id=7, max_message_size=limit
    )
    for chunk in chunks:
        assert len(chunk.to_bytes()) <= limit - 100
    rnd.shuffle(chunks)
    asm = Reassembler()
    results = [asm.add(Chunk.from_bytes(c.to_bytes())) for c in chunks]
    assert results[-1] == payload
    assert all(r is None for r in results[:-1])
    assert len(asm) == 0


def test_interleaved_payloads_from_two_devices() -> None:
    a = split_payload(
        os.urandom(5000),
        federation="f",
        stream="update",
        sender="a",
        round_id=1,
        max_message_size=CHUNK_OVERHEAD + 1000,
    )
    b = split_payload(
        os.urandom(4000),
        federation="f",
        stream="update",
        sender="b",
        round_id=1,
        max_message_size=CHUNK_OVERHEAD + 1000,
    )
    asm = Reassembler()
    done = {}
    for ca, cb in zip(reversed(a), reversed(b + b[:1]), strict=True):
        for c in (ca, cb):
            out = asm.add(c)
            if out is not None:
                done[c.sender] = out
    assert len(done["a"]) == 5000 and len(done["b"]) == 4000


def test_redelivered_chunk_is_ignored_and_conflicting_one_rejected() -> None:
    chunks = split_payload(
        b"x" * 3000,
        federation="f",
        stream="model",
        sender="aggregator",
        round_id=2,
        max_message_size=CHUNK_OVERHEAD + 1000,
    )
    asm = Reassembler()
    assert asm.add(chunks[0]) is None
    assert asm.add(chunks[0]) is None
    forged = Chunk(**{**chunks[1].body(), "data": b"y" * len(chunks[1].data)})
    assert asm.add(forged) is None
    with pytest.raises(DecodeError) as info:
        asm.add(chunks[1])
    assert info.value.reason == "chunk_inconsistent"


def test_forged_chunks_fail_the_digest() -> None:
    chunks = split_payload(
        b"a" * 2000,
        federation="f",
        stream="update",
        sender="d",
        round_id=1,
        max_message_size=CHUNK_OVERHEAD + 1000,
    )
    asm = Reassembler()
    asm.add(chunks[0])
    forged = Chunk(**{**chunks[1].body(), "data": b"b" * len(chunks[1].data)})
    with pytest.raises(DecodeError) as info:
        asm.add(forged)
    assert info.value.reason == "chunk_digest"


def test_reassembler_bounds_memory() -> None:
    asm = Reassembler(max_payload_size=10_000, max_pending=3)
    big = Chunk(
        federation="f",
        stream="update",
        sender="d",
        round_id=1,
        payload_digest=b"\0" * 32,
        payload_size=10_001,
        index=0,
        total=2,
        data=b"x",
    )
    with pytest.raises(DecodeError) as info:
        asm.add(big)
    assert info.value.reason == "too_large"
    for i in range(5):
        asm.add(
            Chunk(
                federation="f",
                stream="update",
                sender=f"d{i}",
                round_id=1,
                payload_digest=bytes([i]) * 32,
                payload_size=100,
                index=0,
                total=2,
                data=b"x",
            )
        )
    assert len(asm) == 3 and asm.evicted == 2
    assert asm.discard(sender="d4") == 1


def test_split_refuses_tiny_limits_and_empty_payloads() -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        split_payload(
            b"x", federation="f", stream="update", sender="d", round_id=0, max_message_size=100
        )
    with pytest.raises(ValueError, match="empty"):
        split_payload(b"", federation="f", stream="update", sender="d", round_id=0)


def test_topics_and_parsing() -> None:
    t = Topics("fleet-1")
    assert t.updates("dev-9") == "edgefl/v1/fleet-1/updates/dev-9"
    assert parse_topic(t.updates("dev-9")).device_id == "dev-9"  # type: ignore[union-attr]
    assert parse_topic(t.model(3)).index == 3  # type: ignore[union-attr]
    assert parse_topic(t.round).kind == "round"  # type: ignore[union-attr]
    parsed = parse_topic(t.keyholder_result("keyholder-2"))
    assert parsed is not None and parsed.kind == "keyholder/result"
    assert parsed.device_id == "keyholder-2"
    assert parse_topic(t.base + "/keyholder/result") is None  # schema 2: one topic per member
    for bad in (
        "edgefl/v1/f",
        "other/v1/f/round",
        "edgefl/v1/f/updates/a/b",
        "edgefl/v1/f/updates/bad id",
        "edgefl/v2/f/round",
    ):
        assert parse_topic(bad) is None
    with pytest.raises(ValueError):
        t.updates("+")
    with pytest.raises(ValueError):
        Topics("a/b")


def test_identity_sign_verify_and_registry(tmp_path: Path) -> None:
    ident = DeviceIdentity.generate("dev-1")
    ident.save(tmp_path / "dev.key")
    assert (tmp_path / "dev.key").stat().st_mode & 0o077 == 0
    again = DeviceIdentity.load(tmp_path / "dev.key")
    assert again.public_key_bytes == ident.public_key_bytes
    reg = DeviceRegistry(tmp_path / "registry.json", "fed")
    reg.enroll("dev-1", ident.public_key_bytes)
    reg.save()
    reg = DeviceRegistry.load(tmp_path / "registry.json")
    sig = again.sign(b"hello")
    reg.verify("dev-1", b"hello", sig)
    with pytest.raises(InvalidSignatureError):
        reg.verify("dev-1", b"hellO", sig)
    with pytest.raises(InvalidSignatureError) as info:
        reg.verify("dev-2", b"hello", sig)
    assert info.value.reason == "unknown_device"
    reg.revoke("dev-1")
    with pytest.raises(InvalidSignatureError) as info:
        reg.verify("dev-1", b"hello", sig)
    assert info.value.reason == "revoked"
    with pytest.raises(ValueError, match="new key"):
        reg.enroll("dev-1", ident.public_key_bytes)
    reg.enroll("dev-1", DeviceIdentity.generate("dev-1").public_key_bytes)
    assert reg.is_active("dev-1")


def test_identity_refuses_unsafe_or_broken_key_files(tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    DeviceIdentity.generate("d").save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        DeviceIdentity.load(path)
    path.chmod(0o600)
    path.write_text("{nope")
    with pytest.raises(KeyFileError, match="malformed"):
        DeviceIdentity.load(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        DeviceIdentity.load(tmp_path / "missing.key")
    (tmp_path / "reg.json").write_text('{"format": "x"}')
    with pytest.raises(ConfigError, match="malformed"):
        DeviceRegistry.load(tmp_path / "reg.json")
