"""The one multi-exponentiation (binding proofs and threshold share proofs use it)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.crypto._multiexp import multi_exp, naive_multi_exp


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**300), st.integers(0, 2**140)), max_size=40),
    st.integers(3, 2**200).map(lambda x: x | 1),
)
def test_multi_exp_equals_separate_powmods(pairs: list[tuple[int, int]], modulus: int) -> None:
    bases = [b for b, _ in pairs]
    exps = [e for _, e in pairs]
    expected = 1 % modulus
    for b, e in pairs:
        expected = expected * pow(b, e, modulus) % modulus
    assert multi_exp(bases, exps, modulus) == expected == naive_multi_exp(bases, exps, modulus)


def test_many_bases_take_the_bucket_path_and_agree() -> None:
    modulus = (1 << 521) - 1
    bases = [pow(3, k + 1, modulus) for k in range(300)]
    exps = [(k * 0x9E3779B97F4A7C15) % (1 << 64) for k in range(300)]
    assert multi_exp(bases, exps, modulus) == naive_multi_exp(bases, exps, modulus)
    assert multi_exp(bases, [0] * 300, modulus) == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="exponents must be >= 0"):
        multi_exp([2], [-1], 7)
    with pytest.raises(ValueError, match="2 bases but 1 exponents"):
        multi_exp([2, 3], [1], 7)
