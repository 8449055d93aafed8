"""The key-holder committee's public manifest and the aggregator's share checks.

Trust model. The federation's Paillier secret key exists only as ``N``
threshold shares (:mod:`aggregator.threshold`), one per committee member.
Any ``T`` members together decrypt a sum; ``T - 1`` learn nothing. Each
member verifies a decryption request on its own (:mod:`aggregator.keyholder`)
before it releases its share, and every share carries a zero-knowledge
proof that it is correct, so a member that sends a wrong share is detected
and named, and the other members' shares still decrypt: never a silently
wrong model.

The manifest (``committee.json``, written by ``edgefl keys ceremony``) is
public: the federation, the key fingerprint, the threshold parameters with
each member's verification key, and each member's id and Ed25519 public key
(results are signed). The aggregator uses it here to check results and to
combine ``T`` shares; it never holds a share.

Compatibility rule for the manifest: ``format``/``version`` are checked
first; fields are never removed or re-purposed; a new layout gets a new
version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.threshold import (
    CommitteePublic,
    DecryptionShare,
    InvalidShareError,
    combine,
    make_context,
    verify_share,
)
from edge_sdk._fs import atomic_write
from edge_sdk.errors import ConfigError, DecodeError, InvalidSignatureError
from edge_sdk.identity import verify_signature
from edge_sdk.protocol import KeyholderRequest, KeyholderResult, WitnessGap

__all__ = [
    "commit_quorum",
    "CommitteeManifest",
    "CommitteeVerifier",
    "HolderInfo",
    "InvalidShareError",
    "request_digest",
    "share_context",
]

_FORMAT = "edgefl-committee"
_VERSION = 1


def commit_quorum(size: int, threshold: int) -> int:
    """Members that must commit to one request before any releases its share.

    ``ceil((N + T) / 2)``: any two such sets share at least ``T`` members, so
    with fewer than ``T`` dishonest members two different sums of one round
    can never both be decrypted. It is also how many members must be online
    for a round to close.
    """
    return -(-(size + threshold) // 2)


def request_digest(request: KeyholderRequest) -> bytes:
    """Identity of a request's substance (round, spec, noise, contributors, sum).

    Two requests with the same digest ask for the decryption of the same sum
    of the same contributors; a member answers at most one digest per round.
    """
    h = hashlib.sha256(b"edgefl/v2/kh-request\x00")
    for part in (
        request.federation.encode(),
        request.round_id.to_bytes(8, "big"),
        request.packing_digest,
        hashlib.sha256(request.privacy).digest(),
        hashlib.sha256(request.contributors).digest(),
        hashlib.sha256(request.encrypted_sum).digest(),
    ):
        h.update(part)
    return h.digest()


def share_context(request: KeyholderRequest) -> bytes:
    """The context a share's proof is bound to: it cannot be replayed for another sum."""
    return make_context(request.federation, request.round_id, request_digest(request))


@dataclass(frozen=True, slots=True, kw_only=True)
class HolderInfo:
    """One committee member as the others and the aggregator know it.

    Attributes:
        holder_id: its id (also its MQTT client id and certificate name).
        index: its share index, 1..N.
        public_key: its raw Ed25519 public key (signs results and approvals).
    """

    holder_id: str
    index: int
    public_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or self.index < 1:
            raise ValueError(f"holder index must be >= 1, got {self.index!r}")
        if len(self.public_key) != 32:
            raise ValueError(f"holder {self.holder_id}: Ed25519 public key must be 32 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitteeManifest:
    """The public description of a federation's key-holder committee.

    Attributes:
        federation: the federation.
        key_fingerprint: the Paillier public key's fingerprint (hex).
        public: the threshold parameters and verification keys.
        holders: every member, by index order.
    """

    federation: str
    key_fingerprint: str
    public: CommitteePublic
    holders: tuple[HolderInfo, ...]

    def __post_init__(self) -> None:
        if len(self.holders) != self.public.holders:
            raise ValueError(
                f"manifest lists {len(self.holders)} holders, the threshold key "
                f"{self.public.holders}"
            )
        indices = sorted(h.index for h in self.holders)
        if indices != list(range(1, self.public.holders + 1)):
            raise ValueError(f"holder indices must be 1..{self.public.holders}, got {indices}")
        ids = [h.holder_id for h in self.holders]
        if len(set(ids)) != len(ids):
            raise ValueError("holder ids must be distinct")

    @property
    def threshold(self) -> int:
        """``T``: shares needed to decrypt."""
        return self.public.threshold

    @property
    def size(self) -> int:
        """``N``: members."""
        return self.public.holders

    def holder(self, holder_id: str) -> HolderInfo | None:
        """The member with this id, or None."""
        for info in self.holders:
            if info.holder_id == holder_id:
                return info
        return None

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) over the canonical JSON encoding."""
        data = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"edgefl/committee/v1\x00" + data).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "federation": self.federation,
            "key_fingerprint": self.key_fingerprint,
            "threshold": self.public.to_dict(),
            "holders": [
                {"id": h.holder_id, "index": h.index, "public_key": h.public_key.hex()}
                for h in sorted(self.holders, key=lambda h: h.index)
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, min_bits: int = 2048) -> CommitteeManifest:
        """Parse and validate the JSON form (``min_bits``: smallest modulus accepted).

        Raises:
            ConfigError: wrong format or version, or an invalid field.
        """
        if doc.get("format") != _FORMAT or doc.get("version") != _VERSION:
            raise ConfigError(
                f"not an edgefl committee manifest (format {doc.get('format')!r}, "
                f"version {doc.get('version')!r})"
            )
        try:
            holders = tuple(
                HolderInfo(
                    holder_id=str(h["id"]),
                    index=int(h["index"]),
                    public_key=bytes.fromhex(str(h["public_key"])),
                )
                for h in doc["holders"]
            )
            return cls(
                federation=str(doc["federation"]),
                key_fingerprint=str(doc["key_fingerprint"]),
                public=CommitteePublic.from_dict(doc["threshold"], min_bits=min_bits),
                holders=holders,
            )
        except (KeyError, TypeError, ValueError, DecodeError) as exc:
            raise ConfigError(f"invalid committee manifest: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the manifest (public; mode 0644)."""
        target = Path(path)
        atomic_write(target, (json.dumps(self.to_json(), indent=2) + "\n").encode(), mode=0o644)
        return target

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        expected_fingerprint: str | None = None,
        min_bits: int = 2048,
    ) -> CommitteeManifest:
        """Read a manifest file.

        Raises:
            ConfigError: unreadable, invalid, or not the pinned one.
        """
        source = Path(path)
        try:
            doc = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read committee manifest {source}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: a committee manifest is a JSON object")
        manifest = cls.from_json(doc, min_bits=min_bits)
        if expected_fingerprint is not None and manifest.fingerprint != expected_fingerprint:
            raise ConfigError(
                f"{source}: committee fingerprint {manifest.fingerprint} is not the pinned "
                f"{expected_fingerprint}"
            )
        return manifest


class CommitteeVerifier:
    """The aggregator's side: checks each member's result and combines ``T`` shares.

    Args:
        manifest: the committee's public manifest.
    """

    def __init__(self, manifest: CommitteeManifest) -> None:
        """Create the verifier."""
        self.manifest = manifest

    def check(
        self, request: KeyholderRequest, ciphertexts: Sequence[int], result: KeyholderResult
    ) -> DecryptionShare | None:
        """Verify a member's result for ``request``.

        Args:
            request: the request it answers.
            ciphertexts: the request's encrypted sum as integers.
            result: the member's result.

        Returns:
            The verified share, or None for a (signed) refusal.

        Raises:
            InvalidSignatureError: unknown member or bad signature.
            InvalidShareError: the share is malformed, from another index, or
                its proof does not verify (the member is misbehaving).
        """
        info = self.manifest.holder(result.holder_id)
        if info is None:
            raise InvalidSignatureError(
                f"result from {result.holder_id!r}, not a committee member", reason="unknown_holder"
            )
        verify_signature(info.public_key, result.signed_bytes(), result.signature)
        if result.status != "ok":
            return None
        try:
            share = DecryptionShare.from_bytes(
                result.share, self.manifest.public, count=len(ciphertexts)
            )
        except DecodeError as exc:
            raise InvalidShareError(info.index, "malformed", str(exc)) from None
        if share.index != info.index:
            raise InvalidShareError(info.index, "wrong_index", f"share for index {share.index}")
        verify_share(self.manifest.public, ciphertexts, share, context=share_context(request))
        return share

    def check_gap(self, gap: WitnessGap) -> None:
        """Verify a member's witness-gap notice is signed by that member.

        Raises:
            InvalidSignatureError: unknown member or bad signature.
        """
        info = self.manifest.holder(gap.holder_id)
        if info is None:
            raise InvalidSignatureError(
                f"gap notice from {gap.holder_id!r}, not a committee member",
                reason="unknown_holder",
            )
        verify_signature(info.public_key, gap.signed_bytes(), gap.signature)

    def combine(self, count: int, shares: Sequence[DecryptionShare]) -> list[int]:
        """Plaintexts of the sum from ``T`` verified shares of distinct members."""
        return combine(self.manifest.public, count, shares)
