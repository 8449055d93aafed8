"""Every size limit of the protocol, derived from one number: :data:`MAX_PARAMS`.

A model has at most ``MAX_PARAMS`` parameters. Everything else follows:

* a global model message carries them as float32: ``4 * MAX_PARAMS`` bytes;
* an encrypted update packs ``floor(key_bits / slot_bits)`` slots into a
  ciphertext of ``2 * key_bits`` bits, i.e. about ``slot_bits / 4`` bytes per
  parameter; with slots of at most :data:`MAX_SLOT_BITS` bits and keys of at
  least 1024 bits that is at most 16 bytes per parameter (6.5 at the default
  16-bit values). The aggregator holds each round to the exact size its
  packing gives; these bounds are the outer ones every decoder applies;
* a decryption share has one value per ciphertext (same size) plus a proof;
* a key-holder request carries the encrypted sum and one signed proof per
  contributor.

Whoever decodes a message passes the limit from here, so a device, the
aggregator and a key holder agree on what is too big.
"""

from __future__ import annotations

__all__ = [
    "MAX_ANNOUNCEMENT_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_CHUNK_DATA_BYTES",
    "MAX_CIPHERTEXT_BYTES",
    "MAX_CONTRIBUTOR_BYTES",
    "MAX_MODEL_BYTES",
    "MAX_ONNX_FILE_BYTES",
    "MAX_PARAMS",
    "MAX_RECEIPT_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_SHARE_BYTES",
    "MAX_SLOT_BITS",
    "MAX_UPDATE_BYTES",
    "MESSAGE_OVERHEAD",
]

#: Most parameters of a model (and of an update, a sum, a share).
MAX_PARAMS = 50_000_000
#: Widest packing slot (value bits + headroom) in bits.
MAX_SLOT_BITS = 62
#: Room for headers, signatures, digests and proofs beside a message's vector.
MESSAGE_OVERHEAD = 1 << 20

#: Float32 weights of the largest model.
MAX_WEIGHT_BYTES = 4 * MAX_PARAMS
#: A whole global-model message.
MAX_MODEL_BYTES = MAX_WEIGHT_BYTES + MESSAGE_OVERHEAD
#: An ONNX file on a device: the weights plus the graph.
MAX_ONNX_FILE_BYTES = MAX_WEIGHT_BYTES + 64 * (1 << 20)
#: The ciphertexts of the largest update (16 bytes per parameter at most).
MAX_CIPHERTEXT_BYTES = 16 * MAX_PARAMS
#: A whole encrypted update message.
MAX_UPDATE_BYTES = MAX_CIPHERTEXT_BYTES + MESSAGE_OVERHEAD
#: The encoded decryption share of the largest sum.
MAX_SHARE_BYTES = MAX_CIPHERTEXT_BYTES + MESSAGE_OVERHEAD
#: The packed contributor proofs of one key-holder request.
MAX_CONTRIBUTOR_BYTES = 64 * (1 << 20)
#: A whole key-holder request (sum plus contributors).
MAX_REQUEST_BYTES = MAX_CIPHERTEXT_BYTES + MAX_CONTRIBUTOR_BYTES + MESSAGE_OVERHEAD
#: One chunk's data (large messages travel as chunks of the broker's size).
MAX_CHUNK_DATA_BYTES = 64 * (1 << 20)
#: A whole chunk message.
MAX_CHUNK_BYTES = MAX_CHUNK_DATA_BYTES + 4096
#: A round announcement.
MAX_ANNOUNCEMENT_BYTES = 64 * 1024
#: A receipt.
MAX_RECEIPT_BYTES = 4096
