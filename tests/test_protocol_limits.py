"""The size limits are one set, derived from MAX_PARAMS, and every party applies them."""

from __future__ import annotations

import pytest

from edge_sdk.protocol import limits
from edge_sdk.protocol._codec import BytesRule, IntRule
from edge_sdk.protocol.messages import EncryptedUpdate, GlobalModel


@pytest.mark.parametrize("key_bits", [1024, 2048, 3072, 4096, 8192])
def test_an_update_never_needs_more_than_16_bytes_per_parameter(key_bits: int) -> None:
    for width in range(3, limits.MAX_SLOT_BITS + 1):
        slots = (key_bits - 1) // width  # PackingSpec's slots per plaintext
        ciphertext_bytes = 2 * key_bits // 8
        assert ciphertext_bytes / slots <= 16, (key_bits, width)
    assert limits.MAX_CIPHERTEXT_BYTES == 16 * limits.MAX_PARAMS


def test_message_rules_use_the_derived_limits() -> None:
    weights, params = GlobalModel.RULES["weights"], GlobalModel.RULES["num_params"]
    ciphertexts = EncryptedUpdate.RULES["ciphertexts"]
    assert isinstance(weights, BytesRule) and isinstance(ciphertexts, BytesRule)
    assert isinstance(params, IntRule)
    assert weights.max_len == 4 * limits.MAX_PARAMS and params.hi == limits.MAX_PARAMS
    assert ciphertexts.max_len == limits.MAX_CIPHERTEXT_BYTES
    assert limits.MAX_MODEL_BYTES > 4 * limits.MAX_PARAMS
    assert limits.MAX_UPDATE_BYTES > limits.MAX_CIPHERTEXT_BYTES


def test_device_model_limit_admits_the_largest_model_the_protocol_allows() -> None:
    # The finding: a device refused models over 64 MiB while the protocol
    # allowed 5 x 10^7 parameters (200 MB of weights).
    from edge_sdk.agent import runner
    from edge_sdk.models import base, onnx_model

    assert runner.MAX_MODEL_BYTES == limits.MAX_MODEL_BYTES
    assert base.MAX_PARAMETERS == limits.MAX_PARAMS
    assert onnx_model.MAX_MODEL_BYTES >= 4 * limits.MAX_PARAMS
