"""Fuzzing every decoder of untrusted bytes: only documented errors, bounded cost.

The default budget keeps `make test` quick; the `slow` run sets
EDGEFL_FUZZ_EXAMPLES (10,000 in the reliability suite). Every generated
payload must either decode to a valid value or raise the decoder's own
documented error type: never another exception.
"""

from __future__ import annotations

import os
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.crypto import CiphertextVector, PackingSpec, generate_keypair
from edge_sdk.errors import DecodeError, InvalidCiphertextError
from edge_sdk.privacy import NoiseSpec
from edge_sdk.protocol import Chunk, Reassembler, decode_message
from tests.protocol_strategies import any_message

EXAMPLES = int(os.environ.get("EDGEFL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REJECTIONS: Counter[str] = Counter()

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    payload = bytearray(draw(any_message).to_bytes())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "c1"]))
        if not payload:
            break
        pos = draw(st.integers(0, len(payload) - 1))
        if op == "flip":
            payload[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del payload[pos:]
        elif op == "insert":
            payload[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "dup":
            payload[pos:pos] = payload[pos : pos + draw(st.integers(1, 16))]
        else:
            payload[pos] = 0xC1
    return bytes(payload)


untrusted = st.one_of(
    st.binary(max_size=300),
    mutated(),
    msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.tuples(st.integers(0, 3), st.text(max_size=12), msgpack_values, st.binary(max_size=10)).map(
        lambda t: msgpack.packb(list(t), use_bin_type=True)
    ),
)


@FUZZ
@given(untrusted)
def test_message_decoder(payload: bytes) -> None:
    try:
        decode_message(payload, max_size=1 << 20)
    except DecodeError as exc:
        REJECTIONS[f"message:{exc.reason}"] += 1


@FUZZ
@given(st.lists(untrusted, min_size=1, max_size=6))
def test_chunk_reassembly(payloads: list[bytes]) -> None:
    asm = Reassembler(max_payload_size=1 << 20, max_pending=4)
    for payload in payloads:
        try:
            asm.add(Chunk.from_bytes(payload))
        except DecodeError as exc:
            REJECTIONS[f"chunk:{exc.reason}"] += 1
    assert len(asm) <= 4


@FUZZ
@given(st.binary(max_size=120) | msgpack_values.map(lambda v: msgpack.packb(v)))
def test_packing_spec_decoder(blob: bytes) -> None:
    try:
        PackingSpec.from_bytes(blob)
    except DecodeError:
        REJECTIONS["packing"] += 1


@FUZZ
@given(msgpack_values | st.dictionaries(st.text(max_size=15), msgpack_values, max_size=16))
def test_noise_spec_decoder(value: object) -> None:
    try:
        NoiseSpec.from_dict(value)
    except DecodeError:
        REJECTIONS["noise"] += 1


@pytest.fixture(scope="module")
def small_key() -> object:
    return generate_keypair(2048)[0]


@FUZZ
@given(st.binary(max_size=2100), st.integers(0, 5))
def test_ciphertext_decoder(small_key: object, blob: bytes, count: int) -> None:
    try:
        CiphertextVector.from_bytes(blob, small_key, count)  # type: ignore[arg-type]
    except InvalidCiphertextError as exc:
        REJECTIONS[f"ciphertext:{exc.reason}"] += 1
    except ValueError:
        REJECTIONS["ciphertext:count"] += 1


def test_rejections_were_counted() -> None:
    # runs last in this module: the fuzzers above really exercised rejections
    assert sum(REJECTIONS.values()) > 0
