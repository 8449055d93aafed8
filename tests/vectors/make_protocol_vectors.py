"""Regenerate tests/vectors/protocol_invalid.json (run from the repo root).

Each invalid case holds the payload as hex and the DecodeError reason it must
produce; valid cases hold a canonical payload and its decoded fields. These
are the normative examples of docs/protocol.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgpack

from edge_sdk.protocol import DeviceStatus, Receipt, RoundAnnouncement
from edge_sdk.protocol._codec import _check, _pack, encode


def status_body() -> dict[str, object]:
    return DeviceStatus(
        federation="fed", device_id="dev-1", state="online", round_id=3, issued_ms=1000
    ).body()


def main() -> None:
    good = DeviceStatus(
        federation="fed", device_id="dev-1", state="online", round_id=3, issued_ms=1000
    )
    payload = good.to_bytes()
    receipt = Receipt(
        federation="fed",
        round_id=3,
        device_id="dev-1",
        update_digest=bytes(range(32)),
        status="accepted",
        issued_ms=2000,
    )
    announcement = RoundAnnouncement(
        federation="fed",
        round_id=1,
        model_version=0,
        model_digest=b"\x11" * 32,
        issued_ms=0,
        deadline_ms=60_000,
        min_clients=2,
        max_contributors=1000,
        key_fingerprint=b"\x22" * 32,
        packing=b"spec",
        packing_digest=b"\x33" * 32,
        train=(("epochs", 1), ("lr", 0.1)),
    )

    def with_body(body: dict[str, object], kind: str = "status") -> str:
        return encode(kind, body).hex()

    missing = status_body()
    del missing["detail"]
    extra = {**status_body(), "colour": "red"}
    wrong_type = {**status_body(), "issued_ms": "1000"}
    bad_state = {**status_body(), "state": "dancing"}
    reordered = dict(reversed(list(status_body().items())))
    deep = {**status_body(), "detail": [[[[[["x"]]]]]]}
    nan_train = {**announcement.body(), "train": (("lr", float("nan")),)}
    head = [2, "status", status_body()]
    # issued_ms 1000 re-encoded as uint64 (0xcf) instead of uint16: same value,
    # valid checksum over the canonical form, but not the canonical bytes.
    canonical_ms = msgpack.packb(1000)
    wide_ms = b"\xcf" + (1000).to_bytes(8, "big")
    non_canonical = payload.replace(b"issued_ms" + canonical_ms, b"issued_ms" + wide_ms)
    assert non_canonical != payload

    invalid = [
        ("empty", b"".hex(), "malformed"),
        ("truncated", payload[:-1].hex(), "malformed"),
        ("trailing_byte", (payload + b"\x00").hex(), "malformed"),
        ("reserved_byte_c1", "c1", "malformed"),
        ("reserved_byte_inside", payload.replace(b"\xa3fed", b"\xc1fed", 1).hex(), "malformed"),
        ("huge_declared_bin32", "c67fffffff00", "malformed"),
        ("huge_declared_array32", "dd7fffffff", "malformed"),
        ("ext_type", msgpack.packb(msgpack.ExtType(1, b"x")).hex(), "malformed"),
        ("int_map_key", _pack([2, "status", {1: 2}, b"12345678"]).hex(), "malformed"),
        ("not_an_array", _pack({"v": 1}).hex(), "structure"),
        ("three_elements", _pack(head).hex(), "structure"),
        (
            "unknown_version",
            _pack([3, "status", status_body(), _check(_pack([3, "status", status_body()]))]).hex(),
            "version",
        ),
        (
            "schema_1_refused",
            _pack([1, "status", status_body(), _check(_pack([1, "status", status_body()]))]).hex(),
            "version",
        ),
        ("version_as_string", _pack(["2", "status", status_body(), b"12345678"]).hex(), "version"),
        (
            "unknown_kind",
            _pack([2, "pickle", {}, _check(_pack([2, "pickle", {}]))]).hex(),
            "unknown_kind",
        ),
        ("deep_nesting", with_body(deep), "structure"),
        ("missing_field", with_body(missing), "fields"),
        ("unknown_field", with_body(extra), "fields"),
        ("fields_out_of_order", with_body(reordered), "fields"),
        ("wrong_field_type", with_body(wrong_type), "invalid_field"),
        ("value_not_allowed", with_body(bad_state), "invalid_field"),
        ("nan_in_train_config", with_body(nan_train, "round"), "invalid_field"),
        ("checksum_mismatch", (payload[:-1] + bytes([payload[-1] ^ 1])).hex(), "checksum"),
        ("non_canonical_int", non_canonical.hex(), "not_canonical"),
    ]
    valid = [
        {"kind": "status", "hex": payload.hex(), "fields": {k: v for k, v in good.body().items()}},
        {
            "kind": "receipt",
            "hex": receipt.to_bytes().hex(),
            "fields": {
                k: (v.hex() if isinstance(v, bytes) else v) for k, v in receipt.body().items()
            },
        },
        {
            "kind": "round",
            "hex": announcement.to_bytes().hex(),
            "fields": {"round_id": 1, "min_clients": 2, "packing": b"spec".hex()},
        },
    ]
    doc = {
        "description": "edgefl wire protocol schema 2 vectors: invalid payloads with the "
        "DecodeError reason each must raise, and valid canonical payloads.",
        "invalid": [{"name": n, "hex": h, "reason": r} for n, h, r in invalid],
        "valid": valid,
    }
    out = Path(__file__).parent / "protocol_invalid.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out} ({len(invalid)} invalid, {len(valid)} valid)")


if __name__ == "__main__":
    main()
