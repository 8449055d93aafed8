"""The wire messages of edgefl (schema version 2).

Every type here is a frozen, slotted, keyword-only dataclass that validates
on construction; decode with :func:`decode_message` or ``Type.from_bytes``.

Compatibility rule: within a schema version the fields of every kind are
fixed (version 2 added ``binding`` to updates and proofs, ``privacy`` to key
holder requests, and replaced the key holder's plaintext ``aggregate`` by a
committee member's ``holder_id`` and decryption ``share``). A new field
means a new schema version; decoders accept a closed set of versions and
reject the rest. Fields are never removed or given a new
meaning. Kinds are looked up in a closed table; nothing named by wire data is
imported or instantiated outside it.

Digests are SHA-256 (32 bytes). Times are integer milliseconds since the Unix
epoch. Big integers (ciphertexts) travel inside fixed-width big-endian byte
blobs produced by ``edge_sdk.crypto``; this module treats them as opaque
bytes plus their digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

from edge_sdk.errors import DecodeError
from edge_sdk.ids import ID_PATTERN
from edge_sdk.protocol._codec import (
    BytesRule,
    IntRule,
    Message,
    PairsRule,
    Rule,
    StrRule,
    StrTupleRule,
    decode_any,
    encode,
    register,
)
from edge_sdk.protocol.limits import (
    MAX_ANNOUNCEMENT_BYTES,
    MAX_CHUNK_DATA_BYTES,
    MAX_CIPHERTEXT_BYTES,
    MAX_CONTRIBUTOR_BYTES,
    MAX_PARAMS,
    MAX_SHARE_BYTES,
    MAX_WEIGHT_BYTES,
)
from edge_sdk.protocol.topics import MAX_SHARDS

__all__ = [
    "DIGEST_LEN",
    "MAX_GAP_DEVICES",
    "MAX_PARAMS",
    "SIGNATURE_LEN",
    "Chunk",
    "ContributorProof",
    "DeviceStatus",
    "EncryptedUpdate",
    "GlobalModel",
    "KeyholderCommit",
    "KeyholderRequest",
    "KeyholderResult",
    "Receipt",
    "RoundAnnouncement",
    "PartialSum",
    "ShardControl",
    "WitnessGap",
    "decode_message",
    "digest",
    "model_digest",
]

DIGEST_LEN = 32
SIGNATURE_LEN = 64
MAX_TIME_MS = 2**53
FEDERATION_PATTERN = ID_PATTERN

_ID = StrRule(max_len=64, pattern=ID_PATTERN)
_FED = StrRule(max_len=64, pattern=FEDERATION_PATTERN)
_ROUND = IntRule(0, 2**62)
_DIGEST = BytesRule(DIGEST_LEN, DIGEST_LEN)
_SIG = BytesRule(SIGNATURE_LEN, SIGNATURE_LEN)
_OPT_SIG = BytesRule(0, SIGNATURE_LEN)
_TIME = IntRule(0, MAX_TIME_MS)
_COUNT = IntRule(0, 1_000_000)
_OPAQUE = BytesRule(0, 16 * 1024)


def digest(data: bytes) -> bytes:
    """SHA-256 of ``data``."""
    return hashlib.sha256(data).digest()


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class RoundAnnouncement(Message):
    """The aggregator opens a round (retained on ``round``).

    Attributes:
        federation: federation name.
        round_id: strictly increasing round number; never reused.
        model_version: version of the global model devices must train from.
        model_digest: digest of that model (:func:`model_digest`).
        issued_ms: when the round opened.
        deadline_ms: updates after this are late.
        cohort: devices asked to take part; empty means every enrolled device.
        min_clients: quorum below which the round fails (and below which the
            key holder refuses to decrypt).
        max_contributors: headroom the packing spec was derived for.
        key_fingerprint: SHA-256 fingerprint of the federation's Paillier key.
        packing: the packing spec's stable encoding (``edge_sdk.crypto``).
        packing_digest: its digest; devices check both agree.
        privacy: the noise spec's encoding (``edge_sdk.privacy``), msgpack.
        train: local training settings as (key, scalar) pairs.
        shards: how many aggregator workers take this round's updates (1: a
            single aggregator, topic ``updates/{device}``; more: a device
            publishes on ``updates/{shard}/{device}``, its shard given by
            :func:`~edge_sdk.protocol.shard_of`). Optional: left out of the
            encoding and the signed bytes when 1.
        signature: the aggregator's Ed25519 signature over
            :meth:`signed_bytes` (empty when the federation does not sign).
    """

    KIND: ClassVar[str] = "round"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "model_version": _ROUND,
        "model_digest": _DIGEST,
        "issued_ms": _TIME,
        "deadline_ms": _TIME,
        "cohort": StrTupleRule(max_items=100_000),
        "min_clients": IntRule(1, 1_000_000),
        "max_contributors": IntRule(1, 1_000_000),
        "key_fingerprint": _DIGEST,
        "packing": _OPAQUE,
        "packing_digest": _DIGEST,
        "privacy": _OPAQUE,
        "train": PairsRule(),
        "shards": IntRule(1, MAX_SHARDS),
        "signature": _OPT_SIG,
    }
    OPTIONAL: ClassVar[dict[str, Any]] = {"shards": 1}

    federation: str
    round_id: int
    model_version: int
    model_digest: bytes
    issued_ms: int
    deadline_ms: int
    cohort: tuple[str, ...] = ()
    min_clients: int
    max_contributors: int
    key_fingerprint: bytes
    packing: bytes
    packing_digest: bytes
    privacy: bytes = b""
    train: tuple[tuple[str, Any], ...] = ()
    shards: int = 1
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Bytes the aggregator signs (everything but the signature)."""
        return self._signature_view("round-sig")

    def _validate(self) -> None:
        if self.deadline_ms < self.issued_ms:
            raise ValueError(
                f"round.deadline_ms ({self.deadline_ms}) is before issued_ms ({self.issued_ms})"
            )
        if self.min_clients > self.max_contributors:
            raise ValueError(
                f"round.min_clients ({self.min_clients}) exceeds max_contributors "
                f"({self.max_contributors})"
            )
        if self.cohort and len(self.cohort) < self.min_clients:
            raise ValueError(
                f"round.cohort has {len(self.cohort)} devices, fewer than min_clients "
                f"({self.min_clients})"
            )

    def train_config(self) -> dict[str, Any]:
        """Return ``train`` as a dict."""
        return dict(self.train)

    def in_cohort(self, device_id: str) -> bool:
        """True when ``device_id`` is asked to take part."""
        return not self.cohort or device_id in self.cohort


def model_digest(version: int, parent_digest: bytes, weights: bytes) -> bytes:
    """Digest of a global model version: a hash chain over versions."""
    head = b"edgefl/v1/model\x00" + version.to_bytes(8, "big") + parent_digest
    return digest(head + digest(weights))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalModel(Message):
    """A global model version (chunked, retained on ``model/{i}``).

    Attributes:
        federation: federation name.
        version: model version (0 = the initial model).
        round_id: the round whose aggregate produced it (0 for the initial).
        parent_digest: digest of the previous version (zeros for version 0).
        digest: :func:`model_digest` of this version; checked on construction.
        num_params: number of float32 weights.
        weights: the flat weight vector, float32 little-endian.
        created_ms: when it was produced.
        signature: the aggregator's Ed25519 signature over :meth:`signed_bytes`
            (empty when the federation does not sign models).
    """

    KIND: ClassVar[str] = "model"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "version": _ROUND,
        "round_id": _ROUND,
        "parent_digest": _DIGEST,
        "digest": _DIGEST,
        "num_params": IntRule(1, MAX_PARAMS),
        "weights": BytesRule(4, MAX_WEIGHT_BYTES),
        "created_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    version: int
    round_id: int
    parent_digest: bytes
    digest: bytes
    num_params: int
    weights: bytes
    created_ms: int
    signature: bytes = b""

    def _validate(self) -> None:
        if len(self.weights) != 4 * self.num_params:
            raise ValueError(
                f"model.weights has {len(self.weights)} bytes, expected 4 x num_params "
                f"= {4 * self.num_params}"
            )
        if self.digest != model_digest(self.version, self.parent_digest, self.weights):
            raise ValueError("model.digest does not match version, parent and weights")

    def signed_bytes(self) -> bytes:
        """Bytes the aggregator signs: domain, federation and the digest chain."""
        return b"edgefl/v1/model-sig\x00" + self.federation.encode() + b"\x00" + self.digest


_UPDATE_RULES: dict[str, Rule] = {
    "federation": _FED,
    "round_id": _ROUND,
    "device_id": _ID,
    "key_fingerprint": _DIGEST,
    "packing_digest": _DIGEST,
    "privacy_digest": _DIGEST,
    "num_params": IntRule(1, MAX_PARAMS),
    "num_ciphertexts": IntRule(1, MAX_PARAMS),
    "ciphertext_digest": _DIGEST,
    "created_ms": _TIME,
    # Schema 2: the sender's proof that it knows the plaintexts of these
    # ciphertexts, bound to (federation, round, device, spec, ciphertext
    # digest); see edge_sdk.crypto.binding. Empty only where the federation
    # runs without binding (development keys without a committee base).
    "binding": BytesRule(0, 2048),
}


def _update_signing_bytes(fields: dict[str, Any]) -> bytes:
    return b"edgefl/v1/update-sig\x00" + encode("update-sig", fields)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ContributorProof(Message):
    """A signed update without its ciphertexts: what the key holder verifies.

    The device's Ed25519 signature covers exactly these header fields, among
    them the SHA-256 of the ciphertext blob, so the key holder can check who
    contributed without receiving the ciphertexts.
    """

    KIND: ClassVar[str] = "proof"
    RULES: ClassVar[dict[str, Rule]] = {**_UPDATE_RULES, "signature": _SIG}

    federation: str
    round_id: int
    device_id: str
    key_fingerprint: bytes
    packing_digest: bytes
    privacy_digest: bytes
    num_params: int
    num_ciphertexts: int
    ciphertext_digest: bytes
    created_ms: int
    binding: bytes = b""
    signature: bytes

    def signing_bytes(self) -> bytes:
        """The bytes the device signed."""
        return _update_signing_bytes({k: getattr(self, k) for k in _UPDATE_RULES})

    @property
    def update_digest(self) -> bytes:
        """Identity of the update: digest of the signed header and signature."""
        return digest(self.signing_bytes() + self.signature)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedUpdate(Message):
    """A device's encrypted, signed update for one round (chunked on ``updates/{id}``).

    Attributes:
        federation, round_id, device_id: who and when; bound by the signature.
        key_fingerprint: the Paillier key the ciphertexts are under.
        packing_digest: the packing spec used; must match the round's.
        privacy_digest: digest of the noise spec the device applied.
        num_params: length of the model delta.
        num_ciphertexts: number of packed ciphertexts in ``ciphertexts``.
        ciphertext_digest: SHA-256 of ``ciphertexts`` (checked here).
        created_ms: when the device built the update.
        binding: proof of plaintext knowledge bound to sender and round
            (schema 2; :mod:`edge_sdk.crypto.binding`).
        ciphertexts: fixed-width big-endian ciphertext blob.
        signature: Ed25519 over :meth:`signing_bytes`.
    """

    KIND: ClassVar[str] = "update"
    RULES: ClassVar[dict[str, Rule]] = {
        **_UPDATE_RULES,
        "ciphertexts": BytesRule(1, MAX_CIPHERTEXT_BYTES),
        "signature": _SIG,
    }

    federation: str
    round_id: int
    device_id: str
    key_fingerprint: bytes
    packing_digest: bytes
    privacy_digest: bytes
    num_params: int
    num_ciphertexts: int
    ciphertext_digest: bytes
    created_ms: int
    binding: bytes = b""
    ciphertexts: bytes
    signature: bytes

    def _validate(self) -> None:
        if len(self.ciphertexts) % self.num_ciphertexts:
            raise ValueError(
                f"update.ciphertexts ({len(self.ciphertexts)} bytes) is not a whole number "
                f"of {self.num_ciphertexts} ciphertexts"
            )
        if digest(self.ciphertexts) != self.ciphertext_digest:
            raise ValueError("update.ciphertext_digest does not match the ciphertexts")

    def header_fields(self) -> dict[str, Any]:
        """The signed header fields, in order."""
        return {k: getattr(self, k) for k in _UPDATE_RULES}

    def signing_bytes(self) -> bytes:
        """The bytes the device signs (header only, ciphertexts via their digest)."""
        return _update_signing_bytes(self.header_fields())

    def proof(self) -> ContributorProof:
        """The header and signature, for the key holder."""
        return ContributorProof(**self.header_fields(), signature=self.signature)

    @property
    def update_digest(self) -> bytes:
        """Identity of the update (equal to its proof's)."""
        return digest(self.signing_bytes() + self.signature)


RECEIPT_STATUSES = frozenset({"accepted", "duplicate", "late", "rejected"})


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt(Message):
    """The aggregator's application-level receipt for an update (on ``ack/{id}``).

    ``status`` is ``accepted`` (durably stored and counted), ``duplicate``
    (already counted once), ``late`` (round closed) or ``rejected``. Reasons
    sent to devices stay coarse; the precise reason is logged and counted
    at the aggregator.
    """

    KIND: ClassVar[str] = "receipt"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "device_id": _ID,
        "update_digest": _DIGEST,
        "status": StrRule(max_len=16, choices=RECEIPT_STATUSES),
        "reason": StrRule(max_len=64),
        "issued_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    round_id: int
    device_id: str
    update_digest: bytes
    status: str
    reason: str = ""
    issued_ms: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Bytes the aggregator signs (everything but the signature)."""
        return self._signature_view("receipt-sig")


DEVICE_STATES = frozenset(
    {"online", "offline", "training", "uploading", "waiting", "skipped", "error"}
)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceStatus(Message):
    """Device presence and progress (on ``status/{id}``; the last will says offline)."""

    KIND: ClassVar[str] = "status"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "device_id": _ID,
        "state": StrRule(max_len=16, choices=DEVICE_STATES),
        "round_id": IntRule(-1, 2**62),
        "detail": StrRule(max_len=256),
        "issued_ms": _TIME,
    }

    federation: str
    device_id: str
    state: str
    round_id: int = -1
    detail: str = ""
    issued_ms: int


CHUNK_STREAMS = frozenset({"update", "model"})
MAX_CHUNKS = 65_536


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(Message):
    """One piece of a larger payload (an update or a model), reassembled by digest.

    Attributes:
        federation: federation name.
        stream: ``update`` or ``model``.
        sender: device id, or ``aggregator``.
        round_id: the update's round, or the model's version.
        payload_digest: SHA-256 of the whole payload.
        payload_size: its size in bytes.
        index: 0-based chunk index.
        total: number of chunks.
        data: this chunk's bytes.
    """

    KIND: ClassVar[str] = "chunk"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "stream": StrRule(max_len=8, choices=CHUNK_STREAMS),
        "sender": _ID,
        "round_id": _ROUND,
        "payload_digest": _DIGEST,
        "payload_size": IntRule(1, 1 << 34),
        "index": IntRule(0, MAX_CHUNKS - 1),
        "total": IntRule(1, MAX_CHUNKS),
        "data": BytesRule(1, MAX_CHUNK_DATA_BYTES),
    }

    federation: str
    stream: str
    sender: str
    round_id: int
    payload_digest: bytes
    payload_size: int
    index: int
    total: int
    data: bytes

    def _validate(self) -> None:
        if self.index >= self.total:
            raise ValueError(f"chunk.index ({self.index}) must be < total ({self.total})")
        if len(self.data) > self.payload_size:
            raise ValueError("chunk.data is larger than the whole payload")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KeyholderRequest(Message):
    """The aggregator asks the key holder to decrypt a round's encrypted sum.

    Attributes:
        federation, round_id: the round.
        request_id: idempotency key chosen by the aggregator.
        packing: packing spec encoding (the key holder re-derives its digest).
        packing_digest: its digest; must match every proof.
        privacy: the round's noise spec encoding (schema 2); every proof's
            privacy digest must be its digest, and each key holder checks the
            spec against the federation policy before it releases a share.
        contributors: the signed headers of every update in the sum.
        encrypted_sum: fixed-width big-endian ciphertext blob of the sum.
        issued_ms: when the request was made.
    """

    KIND: ClassVar[str] = "kh_request"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "request_id": _ID,
        "packing": _OPAQUE,
        "packing_digest": _DIGEST,
        "privacy": _OPAQUE,
        "contributors": BytesRule(0, MAX_CONTRIBUTOR_BYTES),
        "encrypted_sum": BytesRule(1, MAX_CIPHERTEXT_BYTES),
        "issued_ms": _TIME,
    }

    federation: str
    round_id: int
    request_id: str
    packing: bytes
    packing_digest: bytes
    privacy: bytes = b""
    contributors: bytes
    encrypted_sum: bytes
    issued_ms: int

    @staticmethod
    def pack_proofs(proofs: tuple[ContributorProof, ...]) -> bytes:
        """Concatenate proofs as length-prefixed canonical encodings."""
        out = bytearray()
        for proof in proofs:
            data = proof.to_bytes()
            out += len(data).to_bytes(4, "big") + data
        return bytes(out)

    def proofs(self) -> tuple[ContributorProof, ...]:
        """Decode ``contributors``.

        Raises:
            DecodeError: a proof is malformed.
        """
        return _unpack_proofs(self.contributors)


def _unpack_proofs(blob: bytes) -> tuple[ContributorProof, ...]:
    """Decode length-prefixed contributor proofs (:meth:`KeyholderRequest.pack_proofs`)."""
    out: list[ContributorProof] = []
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise DecodeError("truncated contributor list", reason="malformed")
        size = int.from_bytes(blob[pos : pos + 4], "big")
        pos += 4
        if size > 4096 or pos + size > len(blob):
            raise DecodeError("bad contributor proof length", reason="malformed")
        out.append(ContributorProof.from_bytes(blob[pos : pos + size]))
        pos += size
    return tuple(out)


KEYHOLDER_STATUSES = frozenset({"ok", "refused"})


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KeyholderResult(Message):
    """One committee member's answer: its decryption share with proof, or a refusal.

    Schema 2: no key holder ever sees or sends the plaintext sum. Each holder
    sends its share of the decryption of ``encrypted_sum`` (values
    ``c^(2*Delta*s_i)`` and a proof of correctness, see
    :mod:`aggregator.threshold`); any party combines ``T`` verified shares.

    Attributes:
        federation, round_id, request_id: the request answered.
        holder_id: the committee member answering (its Ed25519 key signs).
        status: ``ok`` (share attached) or ``refused``.
        reason: why, when refused.
        count: contributions in the sum.
        share: the encoded decryption share (empty unless ok).
        issued_ms: when answered.
        signature: the holder's Ed25519 signature over :meth:`signed_bytes`.
    """

    KIND: ClassVar[str] = "kh_result"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "request_id": _ID,
        "holder_id": _ID,
        "status": StrRule(max_len=16, choices=KEYHOLDER_STATUSES),
        "reason": StrRule(max_len=256),
        "count": _COUNT,
        "share": BytesRule(0, MAX_SHARE_BYTES),
        "issued_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    round_id: int
    request_id: str
    holder_id: str
    status: str
    reason: str = ""
    count: int
    share: bytes = b""
    issued_ms: int
    signature: bytes = b""

    def _validate(self) -> None:
        if self.status != "ok" and self.share:
            raise ValueError("kh_result.share must be empty unless status is ok")
        if self.status == "ok" and not self.share:
            raise ValueError("kh_result.share is required when status is ok")

    def signed_bytes(self) -> bytes:
        """Bytes the key holder signs (everything but the signature)."""
        return self._signature_view("kh-result-sig")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class KeyholderCommit(Message):
    """A committee member's commitment: the one request it answers for a round.

    Each member signs at most one request digest per round and releases its
    decryption share only once it holds commitments to the SAME digest from
    a commit quorum of ``ceil((N + T) / 2)`` members. Any two such quorums
    share at least ``T`` members, so with fewer than ``T`` dishonest members
    no two different sums of one round can both be decrypted (a dishonest
    aggregator showing different sums to different members gets neither).

    Attributes:
        federation, round_id: the round.
        holder_id: the committing member.
        request_digest: :func:`aggregator.committee.request_digest` of the request.
        issued_ms: when committed.
        signature: the member's Ed25519 signature over :meth:`signed_bytes`.
    """

    KIND: ClassVar[str] = "kh_commit"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "holder_id": _ID,
        "request_digest": _DIGEST,
        "issued_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    round_id: int
    holder_id: str
    request_digest: bytes
    issued_ms: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Bytes the member signs (everything but the signature)."""
        return self._signature_view("kh-commit-sig")


MAX_GAP_DEVICES = 1000


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class WitnessGap(Message):
    """A committee member's notice: contributors of a request whose updates it never saw.

    The broker can lose a member's copy of an update that reached the
    aggregator (a clustered broker losing a node drops sessions). The
    aggregator answers by relaying those devices' own signed updates on
    ``keyholder/relay/{holder}``; the member checks them exactly as if the
    broker had delivered them (device signature, binding), so the relay adds
    no trust in the aggregator. At most :data:`MAX_GAP_DEVICES` devices per
    notice; a member still missing more sends another on the next re-ask.

    Attributes:
        federation, round_id, request_id: the request it cannot answer yet.
        holder_id: the member.
        devices: device ids whose updates for ``round_id`` it lacks.
        issued_ms: when sent.
        signature: the member's Ed25519 signature over :meth:`signed_bytes`.
    """

    KIND: ClassVar[str] = "kh_gap"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "request_id": _ID,
        "holder_id": _ID,
        "devices": StrTupleRule(max_items=MAX_GAP_DEVICES),
        "issued_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    round_id: int
    request_id: str
    holder_id: str
    devices: tuple[str, ...]
    issued_ms: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Bytes the member signs (everything but the signature)."""
        return self._signature_view("kh-gap-sig")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ShardControl(Message):
    """The aggregator root tells its workers which round is open and when it is sealed.

    Retained on ``aggregator/control``. A worker takes the round's updates
    of its shard while ``sealed`` is false; once it sees ``sealed`` it takes
    no more (they are late), makes its partial sum durable and reports it
    whole. Signed with the aggregator's identity (the root and its workers
    share it); a worker refuses an unsigned or forged one.

    Attributes:
        federation: federation name.
        round_id: the round.
        announcement: that round's signed RoundAnnouncement (its encoding).
        sealed: collection of this round has ended.
        finished: the root ran its configured rounds (no round follows).
        issued_ms: when sent.
        signature: the aggregator's Ed25519 signature over :meth:`signed_bytes`.
    """

    KIND: ClassVar[str] = "shard_control"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "announcement": BytesRule(1, MAX_ANNOUNCEMENT_BYTES),
        "sealed": IntRule(0, 1),
        "finished": IntRule(0, 1),
        "issued_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    round_id: int
    announcement: bytes
    sealed: int
    finished: int = 0
    issued_ms: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Bytes the root signs (everything but the signature)."""
        return self._signature_view("shard-control-sig")


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class PartialSum(Message):
    """One aggregator worker's part of a round: its shard's running encrypted sum.

    Sent on ``aggregator/partial/{worker}`` (chunked when large). While the
    round collects, a worker reports only ``count`` (``sealed`` 0, no sum):
    the root closes on the fleet's total. Sealed, it reports its durable
    sum and the proofs of every update in it; the root adds the sealed sums
    of all ``shards`` workers into the one sum the committee decrypts.

    Attributes:
        federation: federation name.
        round_id: the round.
        worker_id: the worker's id.
        shard: the shard it owns (``0 <= shard < shards``).
        shards: how many shards the round has.
        sealed: 1 for the final, durable partial sum of a sealed round.
        count: updates in the partial sum.
        encrypted_sum: the sum's CiphertextVector encoding (empty unless
            sealed, or when ``count`` is 0).
        contributors: the updates' ContributorProofs
            (:meth:`KeyholderRequest.pack_proofs`; empty unless sealed).
        issued_ms: when sent.
        signature: the aggregator's Ed25519 signature over :meth:`signed_bytes`.
    """

    KIND: ClassVar[str] = "partial_sum"
    RULES: ClassVar[dict[str, Rule]] = {
        "federation": _FED,
        "round_id": _ROUND,
        "worker_id": _ID,
        "shard": IntRule(0, MAX_SHARDS - 1),
        "shards": IntRule(1, MAX_SHARDS),
        "sealed": IntRule(0, 1),
        "count": _COUNT,
        "encrypted_sum": BytesRule(0, MAX_CIPHERTEXT_BYTES),
        "contributors": BytesRule(0, MAX_CONTRIBUTOR_BYTES),
        "issued_ms": _TIME,
        "signature": _OPT_SIG,
    }

    federation: str
    round_id: int
    worker_id: str
    shard: int
    shards: int
    sealed: int
    count: int
    encrypted_sum: bytes = b""
    contributors: bytes = b""
    issued_ms: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        """Bytes the worker signs (everything but the signature)."""
        return self._signature_view("partial-sum-sig")

    def _validate(self) -> None:
        if self.shard >= self.shards:
            raise ValueError(f"partial.shard ({self.shard}) must be < shards ({self.shards})")
        if self.sealed and self.count and not self.encrypted_sum:
            raise ValueError("a sealed partial sum of updates must carry the sum")

    def proofs(self) -> tuple[ContributorProof, ...]:
        """Decode ``contributors``.

        Raises:
            DecodeError: a proof is malformed.
        """
        return _unpack_proofs(self.contributors)


def decode_message(payload: bytes, *, max_size: int | None = None) -> Message:
    """Decode any edgefl message (see ``edge_sdk.protocol._codec.decode_any``)."""
    return decode_any(payload, max_size=max_size)
