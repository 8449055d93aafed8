"""Hypothesis strategies for every wire message type."""

from __future__ import annotations

import hashlib

from hypothesis import strategies as st

from edge_sdk.protocol import (
    Chunk,
    DeviceStatus,
    EncryptedUpdate,
    GlobalModel,
    KeyholderRequest,
    KeyholderResult,
    Receipt,
    RoundAnnouncement,
    model_digest,
)

ids = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
digests = st.binary(min_size=32, max_size=32)
sigs = st.binary(min_size=64, max_size=64)
times = st.integers(0, 2**45)
rounds = st.integers(0, 2**40)
scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.booleans(),
)
train_pairs = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), scalars, max_size=5
).map(lambda d: tuple(d.items()))


@st.composite
def announcements(draw: st.DrawFn) -> RoundAnnouncement:
    issued = draw(times)
    min_clients = draw(st.integers(1, 20))
    cohort = tuple(draw(st.lists(ids, unique=True, min_size=min_clients, max_size=25)))
    return RoundAnnouncement(
        federation=draw(ids),
        round_id=draw(rounds),
        model_version=draw(rounds),
        model_digest=draw(digests),
        issued_ms=issued,
        deadline_ms=issued + draw(st.integers(0, 10**7)),
        cohort=draw(st.sampled_from([(), cohort])),
        min_clients=min_clients,
        max_contributors=min_clients + draw(st.integers(0, 1000)),
        key_fingerprint=draw(digests),
        packing=draw(st.binary(max_size=200)),
        packing_digest=draw(digests),
        privacy=draw(st.binary(max_size=200)),
        train=draw(train_pairs),
    )


@st.composite
def models(draw: st.DrawFn) -> GlobalModel:
    n = draw(st.integers(1, 64))
    weights = draw(st.binary(min_size=4 * n, max_size=4 * n))
    version, parent = draw(rounds), draw(digests)
    return GlobalModel(
        federation=draw(ids),
        version=version,
        round_id=draw(rounds),
        parent_digest=parent,
        digest=model_digest(version, parent, weights),
        num_params=n,
        weights=weights,
        created_ms=draw(times),
        signature=draw(st.sampled_from([b"", b"\x01" * 64])),
    )


@st.composite
def updates(draw: st.DrawFn) -> EncryptedUpdate:
    count = draw(st.integers(1, 4))
    width = draw(st.integers(1, 40))
    blob = draw(st.binary(min_size=count * width, max_size=count * width))
    return EncryptedUpdate(
        federation=draw(ids),
        round_id=draw(rounds),
        device_id=draw(ids),
        key_fingerprint=draw(digests),
        packing_digest=draw(digests),
        privacy_digest=draw(digests),
        num_params=draw(st.integers(1, 10_000)),
        num_ciphertexts=count,
        ciphertext_digest=hashlib.sha256(blob).digest(),
        created_ms=draw(times),
        ciphertexts=blob,
        signature=draw(sigs),
    )


proofs = updates().map(lambda u: u.proof())


@st.composite
def receipts(draw: st.DrawFn) -> Receipt:
    return Receipt(
        federation=draw(ids),
        round_id=draw(rounds),
        device_id=draw(ids),
        update_digest=draw(digests),
        status=draw(st.sampled_from(["accepted", "duplicate", "late", "rejected"])),
        reason=draw(st.text(max_size=20)),
        issued_ms=draw(times),
        signature=draw(st.sampled_from([b"", b"\x02" * 64])),
    )


@st.composite
def statuses(draw: st.DrawFn) -> DeviceStatus:
    return DeviceStatus(
        federation=draw(ids),
        device_id=draw(ids),
        state=draw(st.sampled_from(["online", "offline", "training", "skipped"])),
        round_id=draw(st.integers(-1, 2**40)),
        detail=draw(st.text(max_size=40)),
        issued_ms=draw(times),
    )


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    data = draw(st.binary(min_size=1, max_size=100))
    total = draw(st.integers(1, 10))
    return Chunk(
        federation=draw(ids),
        stream=draw(st.sampled_from(["update", "model"])),
        sender=draw(ids),
        round_id=draw(rounds),
        payload_digest=draw(digests),
        payload_size=len(data) + draw(st.integers(total, 1000)),
        index=draw(st.integers(0, total - 1)),
        total=total,
        data=data,
    )


@st.composite
def kh_requests(draw: st.DrawFn) -> KeyholderRequest:
    ps = tuple(draw(st.lists(proofs, max_size=3)))
    return KeyholderRequest(
        federation=draw(ids),
        round_id=draw(rounds),
        request_id=draw(ids),
        packing=draw(st.binary(max_size=50)),
        packing_digest=draw(digests),
        privacy=draw(st.binary(max_size=40)),
        contributors=KeyholderRequest.pack_proofs(ps),
        encrypted_sum=draw(st.binary(min_size=1, max_size=100)),
        issued_ms=draw(times),
    )


@st.composite
def kh_results(draw: st.DrawFn) -> KeyholderResult:
    status = draw(st.sampled_from(["ok", "refused"]))
    return KeyholderResult(
        federation=draw(ids),
        round_id=draw(rounds),
        request_id=draw(ids),
        holder_id=draw(ids),
        status=status,
        reason="" if status == "ok" else draw(st.text(max_size=30)),
        count=draw(st.integers(0, 1000)),
        share=draw(st.binary(min_size=1, max_size=60)) if status == "ok" else b"",
        issued_ms=draw(times),
        signature=draw(st.sampled_from([b"", b"\x03" * 64])),
    )


any_message = st.one_of(
    announcements(),
    models(),
    updates(),
    proofs,
    receipts(),
    statuses(),
    chunks(),
    kh_requests(),
    kh_results(),
)
