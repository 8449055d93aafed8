"""Known-answer vectors for packing, toy-key Paillier, sums and decryption.

The vectors in tests/vectors/crypto_kat.json were produced by the reference
functions below (plain Python loops, phe's ``raw_encrypt`` / ``raw_decrypt``,
hashlib), written independently of edge_sdk.crypto. Regenerate with
``python tests/test_crypto_vectors.py`` (only when the format changes on purpose).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from phe import paillier

VECTORS = Path(__file__).parent / "vectors" / "crypto_kat.json"

# Toy keys: factorable in microseconds, for vectors only.
TOY_KEYS = {
    "phe-toy": (293, 433),
    "toy64": (4294967279, 4294967291),
}


# -- independent reference implementation ---------------------------------------------


def ref_fingerprint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return hashlib.sha256(
        b"edgefl/paillier-public-key/v1\x00" + len(raw).to_bytes(4, "big") + raw
    ).hexdigest()


def ref_spec(n: int, max_contributors: int, value_bits: int, scale: float) -> dict[str, Any]:
    key_bits = n.bit_length()
    headroom = math.ceil(math.log2(max_contributors + 1))
    width = value_bits + headroom
    return {
        "version": 1,
        "key_bits": key_bits,
        "key_fingerprint": ref_fingerprint(n),
        "value_bits": value_bits,
        "headroom_bits": headroom,
        "slots_per_plaintext": (key_bits - 1) // width,
        "offset": 2 ** (value_bits - 1),
        "scale": scale,
        "max_contributors": max_contributors,
    }


def ref_spec_bytes(spec: dict[str, Any]) -> bytes:
    return (
        b"EFPS"
        + bytes([1])
        + spec["key_bits"].to_bytes(2, "big")
        + bytes([spec["value_bits"], spec["headroom_bits"]])
        + spec["slots_per_plaintext"].to_bytes(2, "big")
        + spec["max_contributors"].to_bytes(4, "big")
        + spec["offset"].to_bytes(8, "big")
        + struct.pack(">d", spec["scale"])
        + bytes.fromhex(spec["key_fingerprint"])
    )


def ref_pack(values: list[int], spec: dict[str, Any]) -> list[int]:
    k = spec["slots_per_plaintext"]
    w = spec["value_bits"] + spec["headroom_bits"]
    out = []
    for start in range(0, len(values), k):
        m = 0
        for i, v in enumerate(values[start : start + k]):
            m += (v + spec["offset"]) << (w * i)
        out.append(m)
    return out


def ref_unpack_sum(
    plaintexts: list[int], spec: dict[str, Any], count: int, length: int
) -> list[int]:
    k = spec["slots_per_plaintext"]
    w = spec["value_bits"] + spec["headroom_bits"]
    out = []
    for m in plaintexts:
        for i in range(k):
            out.append(((m >> (w * i)) & ((1 << w) - 1)) - count * spec["offset"])
    return out[:length]


def ref_quantize(values: list[float], scale: float, stream: bytes) -> list[int]:
    out = []
    for i, x in enumerate(values):
        draw = int.from_bytes(stream[8 * i : 8 * i + 8], "little")
        u = (draw >> 11) / 2.0**53
        y = x * scale
        low = math.floor(y)
        out.append(low + (1 if u < y - low else 0))
    return out


def ref_random_r(n: int, index: int) -> int:
    # Fixed, documented obfuscator randomness for the vectors (units mod n).
    r = (index * 7919 + 12345) % n
    while math.gcd(r, n) != 1 or r == 0:
        r += 1
    return r


def build_vectors() -> dict[str, Any]:
    from edge_sdk.randomness import DeterministicRandom

    cases = []
    params = {"phe-toy": (1, 4, 4.0), "toy64": (3, 8, 16.0)}
    for name, (p, q) in TOY_KEYS.items():
        n = p * q
        pub = paillier.PaillierPublicKey(n)
        priv = paillier.PaillierPrivateKey(pub, p, q)
        max_c, value_bits, scale = params[name]
        spec = ref_spec(n, max_c, value_bits, scale)
        length = 2 * spec["slots_per_plaintext"] + 2
        lo, hi = -spec["offset"], spec["offset"] - 1
        width = ((n * n).bit_length() + 7) // 8
        contributions = []
        r_index = 0
        for j in range(max_c):
            values = [lo + ((i * 37 + j * 11) % (hi - lo + 1)) for i in range(length)]
            values[0], values[-1] = lo, hi
            plaintexts = ref_pack(values, spec)
            rs, cts = [], []
            for m in plaintexts:
                r = ref_random_r(n, r_index)
                r_index += 1
                rs.append(r)
                cts.append(pub.raw_encrypt(m, r_value=r))
            contributions.append(
                {
                    "values": values,
                    "plaintexts": plaintexts,
                    "r": rs,
                    "ciphertexts": cts,
                    "blob_hex": b"".join(c.to_bytes(width, "big") for c in cts).hex(),
                }
            )
        nsq = n * n
        sums = []
        for i in range(len(contributions[0]["ciphertexts"])):
            acc = 1
            for c in contributions:
                acc = acc * c["ciphertexts"][i] % nsq
            sums.append(acc)
        sum_plain = [priv.raw_decrypt(c) for c in sums]
        int_sum = ref_unpack_sum(sum_plain, spec, max_c, length)
        assert int_sum == [sum(c["values"][i] for c in contributions) for i in range(length)]
        invalid = [
            {"reason": "range", "ciphertexts": [0]},
            {"reason": "range", "ciphertexts": [nsq]},
            {"reason": "range", "ciphertexts": [nsq + 1]},
            {"reason": "not_unit", "ciphertexts": [p]},
            {"reason": "not_unit", "ciphertexts": [q * 5]},
            {"reason": "not_unit", "ciphertexts": [1, n]},
        ]
        for item in invalid:
            blob = b""
            for c in item["ciphertexts"]:
                blob += c.to_bytes(width + 1, "big")[-width:] if c < 256**width else b"\xff" * width
            item["blob_hex"] = blob.hex()
            item["count"] = len(item["ciphertexts"])
        seed = f"kat-{name}"
        floats = [0.0, 0.5, -0.5, 1.25, -3.75, 0.3333333333333333, 7.9, -8.0]
        stream = DeterministicRandom(seed).random_bytes(8 * len(floats))
        cases.append(
            {
                "name": name,
                "p": p,
                "q": q,
                "n": n,
                "fingerprint": ref_fingerprint(n),
                "ciphertext_bytes": width,
                "spec": spec,
                "spec_bytes_hex": ref_spec_bytes(spec).hex(),
                "spec_digest_hex": hashlib.sha256(ref_spec_bytes(spec)).hexdigest(),
                "length": length,
                "count": max_c,
                "contributions": contributions,
                "sum_ciphertexts": sums,
                "sum_plaintexts": sum_plain,
                "int_sum": int_sum,
                "dequantized": [v / scale for v in int_sum],
                "invalid_blobs": invalid,
                "quantize": {
                    "seed": seed,
                    "values": floats,
                    "expected": ref_quantize(floats, scale, stream),
                },
            }
        )
    return {"description": "edgefl crypto known-answer vectors (toy keys)", "cases": cases}


# -- tests ----------------------------------------------------------------------------

CASES: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"] if VECTORS.exists() else []
IDS = [c["name"] for c in CASES]


def test_vectors_file_matches_the_reference_generator() -> None:
    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(build_vectors()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_key_fingerprint_and_width(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import PaillierPublicKey

    key = PaillierPublicKey(n=case["n"])
    assert key.fingerprint == case["fingerprint"]
    assert key.ciphertext_bytes == case["ciphertext_bytes"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_spec_derivation_encoding_and_digest(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import PackingSpec, PaillierPublicKey

    s = case["spec"]
    spec = PackingSpec.derive(
        PaillierPublicKey(n=case["n"]), s["max_contributors"], s["value_bits"], s["scale"]
    )
    assert spec.to_dict() == s
    assert spec.to_bytes().hex() == case["spec_bytes_hex"]
    assert spec.digest().hex() == case["spec_digest_hex"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pack_matches_vectors(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import PackingSpec, pack

    spec = PackingSpec.from_dict(case["spec"])
    for contribution in case["contributions"]:
        assert pack(np.array(contribution["values"]), spec) == contribution["plaintexts"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_encrypt_with_fixed_obfuscators_matches_vectors(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import PaillierPublicKey, _raw

    key = PaillierPublicKey(n=case["n"])
    for contribution in case["contributions"]:
        got = [
            int(_raw.raw_encrypt(key, m, _raw.compute_obfuscator(key, r)))
            for m, r in zip(contribution["plaintexts"], contribution["r"], strict=True)
        ]
        assert got == contribution["ciphertexts"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_sum_decrypt_unpack_matches_vectors(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import (
        CiphertextVector,
        PackingSpec,
        PaillierPrivateKey,
        PaillierPublicKey,
        decrypt,
        dequantize,
        sum_ciphertexts,
        unpack_sum,
    )

    key = PaillierPublicKey(n=case["n"])
    spec = PackingSpec.from_dict(case["spec"])
    count = len(case["contributions"][0]["ciphertexts"])
    vectors = [
        CiphertextVector.from_bytes(bytes.fromhex(c["blob_hex"]), key, count)
        for c in case["contributions"]
    ]
    total = sum_ciphertexts(key, vectors, workers=1)
    assert list(total) == case["sum_ciphertexts"]
    plain = decrypt(PaillierPrivateKey(key, case["p"], case["q"]), total)
    assert plain == case["sum_plaintexts"]
    ints = unpack_sum(plain, spec, count=case["count"], length=case["length"])
    assert ints.tolist() == case["int_sum"]
    assert dequantize(ints, spec).tolist() == case["dequantized"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_invalid_blobs_are_rejected_with_their_reason(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import CiphertextVector, PaillierPublicKey
    from edge_sdk.errors import InvalidCiphertextError

    key = PaillierPublicKey(n=case["n"])
    for item in case["invalid_blobs"]:
        with pytest.raises(InvalidCiphertextError) as info:
            CiphertextVector.from_bytes(bytes.fromhex(item["blob_hex"]), key, item["count"])
        assert info.value.reason == item["reason"], item


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_quantize_matches_vectors(case: dict[str, Any]) -> None:
    from edge_sdk.crypto import PackingSpec, quantize
    from edge_sdk.randomness import DeterministicRandom

    spec = PackingSpec.from_dict(case["spec"])
    q = case["quantize"]
    got = quantize(np.array(q["values"]), spec, DeterministicRandom(q["seed"]))
    assert got.tolist() == q["expected"]


if __name__ == "__main__":
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(build_vectors(), indent=1) + "\n")
    sys.exit(0)
