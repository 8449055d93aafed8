"""Packed Paillier for federated sums: keys, packing codec, obfuscator pool, fast sums.

Who uses what:

* devices: :class:`PaillierPublicKey`, :class:`PackingSpec`, :func:`quantize`,
  :func:`clamp`, :func:`pack`, :func:`encrypt` with an :class:`ObfuscatorPool`,
  or :func:`encrypt_bound` with a DJN pool (:class:`DJNBase`,
  :class:`DJNObfuscatorSource`; :mod:`edge_sdk.crypto.binding`);
* the aggregator (blind, public key only): :meth:`CiphertextVector.from_bytes`
  (validates untrusted blobs), :class:`CiphertextAccumulator`,
  :func:`sum_ciphertexts`;
* the key holder: :class:`PaillierPrivateKey`, :func:`decrypt`,
  :func:`unpack_sum`, :func:`dequantize`.

Raw, dangerous parts (explicit obfuscators, unobfuscated encodings, unchecked
packing) live in :mod:`edge_sdk.crypto._raw`.
"""

from edge_sdk.crypto.binding import (
    BindingProof,
    InvalidBindingError,
    binding_context,
    ciphertext_digest,
    encrypt_bound,
    verify_bound,
    verify_many,
)
from edge_sdk.crypto.ciphertext import (
    CiphertextAccumulator,
    CiphertextVector,
    decrypt,
    encrypt,
    sum_ciphertexts,
)
from edge_sdk.crypto.djn import (
    DJNBase,
    DJNObfuscatorSource,
    DJNTableError,
    FixedBaseTable,
)
from edge_sdk.crypto.keyfile import (
    PASSPHRASE_ENV,
    PUBLIC_KEY_FILE,
    SECRET_KEY_FILE,
    load_private_key,
    load_public_key,
    read_passphrase,
    save_private_key,
    save_public_key,
    secret_key_protection,
)
from edge_sdk.crypto.keys import (
    PaillierPrivateKey,
    PaillierPublicKey,
    generate_keypair,
    public_key_from_bytes,
    public_key_to_bytes,
)
from edge_sdk.crypto.packing import (
    ExtraSlot,
    PackingSpec,
    clamp,
    dequantize,
    pack,
    quantize,
    unpack_sum,
)
from edge_sdk.crypto.pool import BackgroundFill, ObfuscatorPool, PoolCorruptedError

__all__ = [
    "PASSPHRASE_ENV",
    "PUBLIC_KEY_FILE",
    "SECRET_KEY_FILE",
    "BackgroundFill",
    "BindingProof",
    "CiphertextAccumulator",
    "CiphertextVector",
    "DJNBase",
    "DJNObfuscatorSource",
    "DJNTableError",
    "ExtraSlot",
    "FixedBaseTable",
    "InvalidBindingError",
    "ObfuscatorPool",
    "PackingSpec",
    "PaillierPrivateKey",
    "PaillierPublicKey",
    "PoolCorruptedError",
    "binding_context",
    "ciphertext_digest",
    "clamp",
    "decrypt",
    "dequantize",
    "encrypt",
    "encrypt_bound",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "pack",
    "public_key_from_bytes",
    "public_key_to_bytes",
    "quantize",
    "read_passphrase",
    "save_private_key",
    "save_public_key",
    "secret_key_protection",
    "sum_ciphertexts",
    "unpack_sum",
    "verify_bound",
    "verify_many",
]
