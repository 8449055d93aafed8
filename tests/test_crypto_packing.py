"""Packing spec and codec: derivation, validation, encodings, properties, overflow."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_sdk.crypto import PackingSpec, clamp, dequantize, pack, quantize, unpack_sum
from edge_sdk.crypto._raw import pack_unsigned
from edge_sdk.errors import DecodeError, SlotOverflowError
from edge_sdk.randomness import DeterministicRandom

FP = "ab" * 32


def make_spec(key_bits: int = 2048, max_c: int = 1000, value_bits: int = 16) -> PackingSpec:
    return PackingSpec.derive(
        key_bits=key_bits, key_fingerprint=FP, max_contributors=max_c, value_bits=value_bits
    )


def slow_pack(values: list[int], spec: PackingSpec) -> list[int]:
    k, w = spec.slots_per_plaintext, spec.slot_bits
    return [
        sum((v + spec.offset) << (w * i) for i, v in enumerate(values[s : s + k]))
        for s in range(0, len(values), k)
    ]


# -- spec -------------------------------------------------------------------------------


def test_derive_gives_the_documented_2048_bit_layout() -> None:
    spec = make_spec()
    assert (spec.headroom_bits, spec.slot_bits, spec.slots_per_plaintext) == (10, 26, 78)
    assert (spec.value_min, spec.value_max, spec.offset) == (-32768, 32767, 32768)
    assert spec.num_plaintexts(50_890) == 653


@given(max_c=st.integers(1, 2**32 - 1))
def test_headroom_is_ceil_log2_of_max_contributors_plus_one(max_c: int) -> None:
    spec = make_spec(max_c=max_c, value_bits=8)
    assert spec.headroom_bits == math.ceil(math.log2(max_c + 1)) or (
        # float log2 can be off by one ulp near powers of two: check exactly
        2 ** (spec.headroom_bits - 1) < max_c + 1 <= 2**spec.headroom_bits
    )
    assert max_c * (2**spec.value_bits - 1) < 2**spec.slot_bits


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"value_bits": 1}, "value_bits"),
        ({"value_bits": 60}, "value_bits"),
        ({"max_c": 0}, "max_contributors"),
        ({"key_bits": 20, "value_bits": 16}, "key_bits"),
    ],
)
def test_derive_rejects_bad_arguments_naming_them(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_spec(**kwargs)


def test_constructor_rejects_inconsistent_fields() -> None:
    good = make_spec().to_dict()
    for field, bad in [
        ("slots_per_plaintext", 77),
        ("headroom_bits", 11),
        ("offset", 1),
        ("scale", -1.0),
        ("scale", float("nan")),
        ("key_fingerprint", "AB" * 32),
    ]:
        data = dict(good, **{field: bad})
        with pytest.raises(DecodeError, match=field):
            PackingSpec.from_dict(data)


def test_dict_and_bytes_round_trip_and_digest_is_stable() -> None:
    spec = PackingSpec.derive(key_bits=3072, key_fingerprint=FP, max_contributors=50, scale=123.5)
    assert PackingSpec.from_dict(spec.to_dict()) == spec
    assert PackingSpec.from_bytes(spec.to_bytes()) == spec
    assert len(spec.digest()) == 32
    other = PackingSpec.derive(key_bits=3072, key_fingerprint=FP, max_contributors=51, scale=123.5)
    assert other.digest() != spec.digest()


def test_from_dict_rejects_unknown_missing_and_versions() -> None:
    data = make_spec().to_dict()
    with pytest.raises(DecodeError, match="unknown"):
        PackingSpec.from_dict(dict(data, extra=1))
    missing = dict(data)
    del missing["scale"]
    with pytest.raises(DecodeError, match="missing"):
        PackingSpec.from_dict(missing)
    with pytest.raises(DecodeError, match="version"):
        PackingSpec.from_dict(dict(data, version=3))


def test_from_bytes_rejects_every_truncation_and_bad_magic() -> None:
    blob = make_spec().to_bytes()
    for cut in range(len(blob)):
        with pytest.raises(DecodeError):
            PackingSpec.from_bytes(blob[:cut])
    with pytest.raises(DecodeError):
        PackingSpec.from_bytes(blob + b"\x00")
    with pytest.raises(DecodeError, match="magic"):
        PackingSpec.from_bytes(b"XXXX" + blob[4:])


# -- quantize / clamp / dequantize ------------------------------------------------------


def test_quantize_is_unbiased_and_within_one_unit() -> None:
    spec = PackingSpec.derive(key_bits=2048, key_fingerprint=FP, max_contributors=10, scale=1.0)
    x = np.full(200_000, 0.3)
    q = quantize(x, spec, DeterministicRandom(1))
    assert set(np.unique(q).tolist()) == {0, 1}
    # Binomial(200000, 0.3): sd of the mean is 0.001; 5 sd bound (false alarm < 1e-6).
    assert abs(q.mean() - 0.3) < 0.005


def test_quantize_keeps_exact_integers_and_is_deterministic_per_seed() -> None:
    spec = PackingSpec.derive(key_bits=2048, key_fingerprint=FP, max_contributors=10, scale=4.0)
    x = np.array([-2.0, 0.0, 1.25, 3.5])
    assert quantize(x, spec, DeterministicRandom(3)).tolist() == [-8, 0, 5, 14]
    y = np.linspace(-1, 1, 101)
    a = quantize(y, spec, DeterministicRandom(9))
    assert np.array_equal(a, quantize(y, spec, DeterministicRandom(9)))
    assert np.all(np.abs(a - y * 4.0) < 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300])
def test_quantize_rejects_non_finite_and_huge(bad: float) -> None:
    with pytest.raises(ValueError):
        quantize(np.array([0.0, bad]), make_spec(), DeterministicRandom(0))


def test_clamp_counts_changed_values() -> None:
    spec = make_spec(value_bits=8)
    out, changed = clamp(np.array([-1000, -128, 0, 127, 128, 5000]), spec)
    assert out.tolist() == [-128, -128, 0, 127, 127, 127]
    assert changed == 3


def test_dequantize_divides_by_scale() -> None:
    spec = PackingSpec.derive(key_bits=2048, key_fingerprint=FP, max_contributors=3, scale=8.0)
    assert dequantize(np.array([8, -4, 0]), spec).tolist() == [1.0, -0.5, 0.0]


# -- pack / unpack ------------------------------------------------------------------------


@st.composite
def spec_and_vectors(draw: st.DrawFn) -> tuple[PackingSpec, list[list[int]], int]:
    key_bits = draw(st.sampled_from([64, 127, 512, 2048]))
    value_bits = draw(st.integers(2, 20))
    max_c = draw(st.integers(1, 300))
    assume(value_bits + max_c.bit_length() <= key_bits - 1)
    spec = make_spec(key_bits=key_bits, max_c=max_c, value_bits=value_bits)
    length = draw(st.integers(0, 3 * spec.slots_per_plaintext + 1))
    count = draw(st.integers(1, min(max_c, 6)))
    elements = st.integers(spec.value_min, spec.value_max)
    vectors = [draw(st.lists(elements, min_size=length, max_size=length)) for _ in range(count)]
    extreme = draw(st.sampled_from([None, "min", "max"]))
    if extreme and length:
        fill = spec.value_min if extreme == "min" else spec.value_max
        vectors = [[fill] * length for _ in range(count)]
    return spec, vectors, length


@settings(max_examples=150, deadline=None)
@given(spec_and_vectors())
def test_pack_matches_the_slot_formula(args: tuple[PackingSpec, list[list[int]], int]) -> None:
    spec, vectors, _ = args
    for v in vectors:
        packed = pack(np.array(v, dtype=np.int64), spec)
        assert packed == slow_pack(v, spec)
        assert all(0 <= m < 2 ** (spec.key_bits - 1) for m in packed)


@settings(max_examples=150, deadline=None)
@given(spec_and_vectors())
def test_sum_of_packed_plaintexts_unpacks_to_exact_sum(
    args: tuple[PackingSpec, list[list[int]], int],
) -> None:
    spec, vectors, length = args
    packed = [pack(np.array(v, dtype=np.int64), spec) for v in vectors]
    sums = [sum(col) for col in zip(*packed, strict=True)] if length else []
    expected = [sum(col) for col in zip(*vectors, strict=True)]
    got = unpack_sum(sums, spec, count=len(vectors), length=length)
    assert got.dtype == np.int64
    assert got.tolist() == expected


@settings(max_examples=40, deadline=None)
@given(spec_and_vectors())
def test_exhausting_max_contributors_at_the_extremes_never_overflows(
    args: tuple[PackingSpec, list[list[int]], int],
) -> None:
    spec, _, _ = args
    length = spec.slots_per_plaintext + 1
    for fill in (spec.value_min, spec.value_max):
        m = pack(np.full(length, fill, dtype=np.int64), spec)
        total = [x * spec.max_contributors for x in m]
        got = unpack_sum(total, spec, count=spec.max_contributors, length=length)
        assert got.tolist() == [fill * spec.max_contributors] * length


def test_pack_rejects_out_of_range_values_naming_indices() -> None:
    spec = make_spec(value_bits=8)
    with pytest.raises(ValueError, match=r"indices \[1, 3\]"):
        pack(np.array([0, 128, 5, -129]), spec)
    with pytest.raises(TypeError):
        pack(np.array([0.5]), spec)


def test_unpack_refuses_counts_the_headroom_cannot_certify() -> None:
    spec = make_spec(max_c=3, value_bits=8)
    m = pack(np.zeros(4, dtype=np.int64), spec)
    with pytest.raises(ValueError, match="count"):
        unpack_sum(m, spec, count=4, length=4)
    with pytest.raises(ValueError, match="count"):
        unpack_sum(m, spec, count=0, length=4)
    with pytest.raises(ValueError, match="plaintexts"):
        unpack_sum(m + m, spec, count=1, length=4)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_unpack_never_returns_a_slot_beyond_honest_reach(data: st.DataObject) -> None:
    """Any plaintext whatsoever: either every slot is honest-reachable, or an error names
    exactly the unreachable slots (raw slot values up to the full slot width)."""
    spec = make_spec(
        key_bits=data.draw(st.sampled_from([64, 256])),
        max_c=data.draw(st.integers(1, 20)),
        value_bits=data.draw(st.integers(2, 12)),
    )
    count = data.draw(st.integers(1, spec.max_contributors))
    k, w = spec.slots_per_plaintext, spec.slot_bits
    length = data.draw(st.integers(1, 2 * k))
    n_pt = spec.num_plaintexts(length)
    raw = data.draw(st.lists(st.integers(0, 2**w - 1), min_size=n_pt * k, max_size=n_pt * k))
    high = data.draw(st.lists(st.integers(0, 1), min_size=n_pt, max_size=n_pt))
    plaintexts = [
        sum(raw[j * k + i] << (w * i) for i in range(k)) + (high[j] << (k * w)) for j in range(n_pt)
    ]
    limit = count * (2**spec.value_bits - 1)
    expected_bad = {i for i, s in enumerate(raw) if s > limit or (i >= length and s != 0)} | {
        j * k + k - 1 for j in range(n_pt) if high[j]
    }
    try:
        got = unpack_sum(plaintexts, spec, count=count, length=length)
    except SlotOverflowError as exc:
        assert set(exc.slots) == expected_bad
        assert expected_bad
    else:
        assert not expected_bad
        assert got.tolist() == [s - count * spec.offset for s in raw[:length]]


def test_malicious_out_of_range_contribution_is_detected_and_named() -> None:
    spec = make_spec(key_bits=512, max_c=10, value_bits=8)
    honest = [pack(np.zeros(5, dtype=np.int64), spec) for _ in range(2)]
    evil_slots = np.array([spec.offset, spec.offset, 2**spec.slot_bits - 1000, spec.offset, 0])
    evil = pack_unsigned(evil_slots, spec)
    total = [a + b + c for a, b, c in zip(honest[0], honest[1], evil, strict=True)]
    with pytest.raises(SlotOverflowError) as info:
        unpack_sum(total, spec, count=3, length=5)
    assert info.value.slots == (2,)
    assert "2" in str(info.value)


def test_pack_unsigned_refuses_values_wider_than_a_slot() -> None:
    spec = make_spec(key_bits=512, max_c=10, value_bits=8)
    with pytest.raises(ValueError):
        pack_unsigned(np.array([2**spec.slot_bits]), spec)
