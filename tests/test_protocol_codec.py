"""Wire codec: round trips, prefixes, corruptions, invalid-payload vectors."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.errors import DecodeError
from edge_sdk.protocol import (
    Chunk,
    DeviceStatus,
    EncryptedUpdate,
    Message,
    Receipt,
    decode_message,
)
from edge_sdk.protocol._codec import encode, registered_kinds
from tests.protocol_strategies import any_message, statuses, updates

VECTORS = Path(__file__).parent / "vectors" / "protocol_invalid.json"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(any_message)
def test_decode_encode_roundtrip(message: Message) -> None:
    assert decode_message(message.to_bytes()) == message


@FAST
@given(any_message)
def test_every_strict_prefix_is_rejected(message: Message) -> None:
    payload = message.to_bytes()
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decode_message(payload[:cut])


@FAST
@given(any_message, st.data())
def test_every_single_byte_corruption_is_rejected(message: Message, data: st.DataObject) -> None:
    payload = message.to_bytes()
    positions = data.draw(
        st.lists(st.integers(0, len(payload) - 1), min_size=1, max_size=40, unique=True)
    )
    for pos in positions:
        delta = data.draw(st.integers(1, 255))
        corrupted = bytearray(payload)
        corrupted[pos] ^= delta
        with pytest.raises(DecodeError):
            decode_message(bytes(corrupted))


def test_exhaustive_single_byte_corruption_of_one_status() -> None:
    payload = DeviceStatus(
        federation="fed", device_id="dev-1", state="online", issued_ms=1
    ).to_bytes()
    for pos in range(len(payload)):
        for delta in range(1, 256):
            corrupted = bytearray(payload)
            corrupted[pos] ^= delta
            with pytest.raises(DecodeError):
                decode_message(bytes(corrupted))


@FAST
@given(any_message, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(message: Message, tail: bytes) -> None:
    with pytest.raises(DecodeError, match="msgpack"):
        decode_message(message.to_bytes() + tail)


@FAST
@given(statuses())
def test_from_bytes_refuses_other_kinds(message: DeviceStatus) -> None:
    with pytest.raises(DecodeError) as info:
        Receipt.from_bytes(message.to_bytes())
    assert info.value.reason == "wrong_kind"


def test_size_bound_comes_before_parsing() -> None:
    message = DeviceStatus(federation="f", device_id="d", state="online", issued_ms=0)
    payload = message.to_bytes()
    with pytest.raises(DecodeError) as info:
        decode_message(payload, max_size=len(payload) - 1)
    assert info.value.reason == "too_large"


def test_kind_table_is_closed() -> None:
    assert set(registered_kinds()) == {
        "round",
        "model",
        "update",
        "proof",
        "receipt",
        "status",
        "chunk",
        "kh_request",
        "kh_result",
        "kh_commit",
        "kh_gap",
        "shard_control",
        "partial_sum",
    }


@settings(max_examples=30, deadline=None)
@given(updates())
def test_update_digest_binds_every_header_field(update: EncryptedUpdate) -> None:
    assert update.proof().update_digest == update.update_digest
    changed = EncryptedUpdate(
        **{**update.header_fields(), "round_id": update.round_id + 1},
        ciphertexts=update.ciphertexts,
        signature=update.signature,
    )
    assert changed.signing_bytes() != update.signing_bytes()


def test_update_refuses_a_ciphertext_digest_mismatch() -> None:
    with pytest.raises(ValueError, match="ciphertext_digest"):
        EncryptedUpdate(
            federation="f",
            round_id=1,
            device_id="d",
            key_fingerprint=b"\0" * 32,
            packing_digest=b"\0" * 32,
            privacy_digest=b"\0" * 32,
            num_params=3,
            num_ciphertexts=1,
            ciphertext_digest=b"\0" * 32,
            created_ms=0,
            ciphertexts=b"abc",
            signature=b"\0" * 64,
        )


def test_construction_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"status\.device_id"):
        DeviceStatus(federation="f", device_id="bad id!", state="online", issued_ms=0)
    with pytest.raises(TypeError, match=r"chunk\.index must be an int"):
        Chunk(
            federation="f",
            stream="update",
            sender="d",
            round_id=0,
            payload_digest=b"\0" * 32,
            payload_size=1,
            index=True,  # type: ignore[arg-type]
            total=1,
            data=b"x",
        )


def _vector_payload(case: dict[str, object]) -> bytes:
    if "hex" in case:
        return bytes.fromhex(str(case["hex"]))
    obj = case["msgpack"]
    if case.get("fix_check"):
        version, kind, body = obj  # type: ignore[misc]
        for key, value in list(body.items()):
            if isinstance(value, dict) and "$hex" in value:
                body[key] = bytes.fromhex(value["$hex"])
        return encode(kind, body) if version == 1 else msgpack.packb([version, kind, body, b""])
    return msgpack.packb(obj, use_bin_type=True)


def _load_vectors() -> list[dict[str, object]]:
    cases: list[dict[str, object]] = json.loads(VECTORS.read_text())["invalid"]
    return cases


@pytest.mark.parametrize("case", _load_vectors(), ids=lambda c: str(c["name"]))
def test_invalid_payload_vectors(case: dict[str, object]) -> None:
    payload = _vector_payload(case)
    with pytest.raises(DecodeError) as info:
        decode_message(payload)
    assert info.value.reason == case["reason"], str(info.value)


def test_valid_vectors_decode_to_their_fields() -> None:
    doc = json.loads(VECTORS.read_text())
    for case in doc["valid"]:
        message = decode_message(bytes.fromhex(case["hex"]))
        assert case["kind"] == message.KIND
        for key, value in case["fields"].items():
            got = getattr(message, key)
            assert (got.hex() if isinstance(got, bytes) else got) == value
