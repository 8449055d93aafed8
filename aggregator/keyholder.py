"""The key holder: decrypts a round's encrypted sum, and nothing smaller.

Trust model. The key holder holds the Paillier secret key; the aggregator
does not. It decrypts only a sum that carries at least ``min_clients``
distinct, enrolled, non-revoked devices' signed contributor proofs for that
round, under the federation's key and the sum's packing spec; it checks the
signatures with its OWN copy of the device registry, and its own
``min_clients`` (never the request's). It answers with the aggregate slot
sums only (int64), signed with its Ed25519 key, and never writes a plaintext
anywhere.

It decrypts at most one sum per (federation, round): a second, different
request for a round it has answered is refused, so an aggregator cannot
learn one device's update as the difference of two sums that differ by that
device. The identical request is answered again (idempotent; an aggregator
that crashed re-asks).

What it cannot check on its own: that ``encrypted_sum`` really is the
product of the listed contributors' ciphertexts. The proofs bind each
device's ciphertext digest, not the sum. An aggregator that lies could ask
for the decryption of one device's ciphertext while listing ``min_clients``
proofs. Give :meth:`KeyHolder.handle` the contributors' ciphertext blobs
(``ciphertexts=``; verify mode) to close that gap: it then checks every
blob against its signed digest and recomputes the product. Without it, the
deployment must trust the aggregator on this point (or run the two on
non-colluding parties and audit).

A sum whose slots exceed what ``count`` honest contributions can reach is
answered with status ``overflow`` and no aggregate: the round is discarded,
never published (a malicious device sent an out-of-range plaintext).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping

import numpy as np

from edge_sdk.crypto import (
    CiphertextVector,
    PackingSpec,
    PaillierPrivateKey,
    decrypt,
    sum_ciphertexts,
    unpack_sum,
)
from edge_sdk.errors import (
    DecodeError,
    InvalidCiphertextError,
    InvalidSignatureError,
    SlotOverflowError,
)
from edge_sdk.identity import DeviceIdentity, DeviceRegistry, verify_signature
from edge_sdk.protocol import ContributorProof, KeyholderRequest, KeyholderResult

__all__ = ["KeyHolder", "KeyholderVerifier", "Refusal"]

log = logging.getLogger("edgefl.keyholder")


class Refusal(Exception):
    """Why a request is refused (``reason`` goes into the result)."""

    def __init__(self, reason: str) -> None:
        """Create the refusal."""
        super().__init__(reason)
        self.reason = reason


class KeyHolder:
    """Checks a decryption request and answers with the aggregate or a refusal.

    Args:
        private_key: the federation's Paillier secret key.
        registry: the key holder's own copy of the device registry.
        federation: the federation it serves.
        min_clients: its own quorum; requests with fewer distinct contributors
            are refused whatever the aggregator claims.
        identity: Ed25519 identity used to sign results (id ``keyholder``).
        clock: milliseconds since the epoch (injected for tests).
    """

    def __init__(
        self,
        private_key: PaillierPrivateKey,
        registry: DeviceRegistry,
        *,
        federation: str,
        min_clients: int,
        identity: DeviceIdentity,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """Create the key holder (no I/O)."""
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        self.private_key = private_key
        self.public_key = private_key.public_key
        self.registry = registry
        self.federation = federation
        self.min_clients = min_clients
        self.identity = identity
        self._clock = clock or (lambda: int(time.time() * 1000))
        self._fingerprint = bytes.fromhex(self.public_key.fingerprint)
        # round -> digest of the one request answered for it
        self._answered: dict[int, bytes] = {}
        self.counters: dict[str, int] = {}

    @staticmethod
    def request_digest(request: KeyholderRequest) -> bytes:
        """Identity of a request's substance (round, spec, contributors, sum)."""
        h = hashlib.sha256(b"edgefl/v1/kh-request\x00")
        for part in (
            request.federation.encode(),
            request.round_id.to_bytes(8, "big"),
            request.packing_digest,
            hashlib.sha256(request.contributors).digest(),
            hashlib.sha256(request.encrypted_sum).digest(),
        ):
            h.update(part)
        return h.digest()

    def answered_rounds(self) -> dict[int, bytes]:
        """Rounds answered so far and their request digests (for persistence)."""
        return dict(self._answered)

    def restore_answered(self, answered: Mapping[int, bytes]) -> None:
        """Reload the rounds answered before a restart."""
        self._answered.update(answered)

    def handle(
        self,
        request: KeyholderRequest,
        *,
        ciphertexts: Mapping[str, bytes] | None = None,
    ) -> KeyholderResult:
        """Check ``request`` and return a signed result (``ok``, ``refused`` or ``overflow``).

        Args:
            request: the aggregator's request.
            ciphertexts: verify mode: each contributor's ciphertext blob by
                device id; the sum is recomputed from them and must match.

        Returns:
            The signed result; never raises for a bad request.
        """
        count = 0
        try:
            spec, proofs = self._check(request)
            count = len(proofs)
            if ciphertexts is not None:
                self._verify_sum(request, spec, proofs, ciphertexts)
            key = self.request_digest(request)
            previous = self._answered.get(request.round_id)
            if previous is not None and previous != key:
                raise Refusal("round_already_decrypted")
            num_params = proofs[0].num_params
            try:
                vector = CiphertextVector.from_bytes(
                    request.encrypted_sum, self.public_key, spec.num_plaintexts(num_params)
                )
            except InvalidCiphertextError as exc:
                raise Refusal(f"sum_{exc.reason}") from None
            self._answered[request.round_id] = key
            plaintexts = decrypt(self.private_key, vector)
            try:
                sums = unpack_sum(plaintexts, spec, count=count, length=num_params)
            except SlotOverflowError as exc:
                log.warning(
                    "round %s: %d slot sums out of range; refusing to release",
                    request.round_id,
                    len(exc.slots),
                )
                return self._result(request, "overflow", f"{len(exc.slots)} slots", count)
            finally:
                del plaintexts
            aggregate = np.ascontiguousarray(sums, dtype="<i8").tobytes()
            self._count("ok")
            return self._result(request, "ok", "", count, aggregate)
        except Refusal as refusal:
            self._count(refusal.reason)
            log.warning("round %s: refused: %s", request.round_id, refusal.reason)
            return self._result(request, "refused", refusal.reason, count)

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _check(self, request: KeyholderRequest) -> tuple[PackingSpec, list[ContributorProof]]:
        if request.federation != self.federation:
            raise Refusal("federation")
        try:
            spec = PackingSpec.from_bytes(request.packing)
        except DecodeError:
            raise Refusal("bad_spec") from None
        if spec.digest() != request.packing_digest:
            raise Refusal("bad_spec")
        if spec.key_fingerprint != self.public_key.fingerprint:
            raise Refusal("wrong_key")
        try:
            proofs = list(request.proofs())
        except DecodeError:
            raise Refusal("bad_proofs") from None
        seen: set[str] = set()
        for proof in proofs:
            if proof.device_id in seen:
                raise Refusal("duplicate_contributor")
            seen.add(proof.device_id)
            if (
                proof.federation != self.federation
                or proof.round_id != request.round_id
                or proof.packing_digest != request.packing_digest
                or proof.key_fingerprint != self._fingerprint
            ):
                raise Refusal("proof_mismatch")
            if proof.num_params != proofs[0].num_params:
                raise Refusal("proof_mismatch")
            if proof.num_ciphertexts != spec.num_plaintexts(proof.num_params):
                raise Refusal("proof_mismatch")
            try:
                self.registry.verify(proof.device_id, proof.signing_bytes(), proof.signature)
            except InvalidSignatureError as exc:
                raise Refusal(f"proof_{exc.reason}") from None
        if len(proofs) < self.min_clients:
            raise Refusal("quorum")
        if len(proofs) > spec.max_contributors:
            raise Refusal("too_many_contributors")
        return spec, proofs

    def _verify_sum(
        self,
        request: KeyholderRequest,
        spec: PackingSpec,
        proofs: list[ContributorProof],
        ciphertexts: Mapping[str, bytes],
    ) -> None:
        vectors = []
        for proof in proofs:
            blob = ciphertexts.get(proof.device_id)
            if blob is None or hashlib.sha256(blob).digest() != proof.ciphertext_digest:
                raise Refusal("verify_ciphertext_missing")
            try:
                vectors.append(
                    CiphertextVector.from_bytes(blob, self.public_key, proof.num_ciphertexts)
                )
            except InvalidCiphertextError:
                raise Refusal("verify_ciphertext_invalid") from None
        total = sum_ciphertexts(self.public_key, vectors)
        if total.to_bytes() != request.encrypted_sum:
            raise Refusal("verify_sum_mismatch")

    def _result(
        self,
        request: KeyholderRequest,
        status: str,
        reason: str,
        count: int,
        aggregate: bytes = b"",
    ) -> KeyholderResult:
        unsigned = KeyholderResult(
            federation=request.federation,
            round_id=request.round_id,
            request_id=request.request_id,
            status=status,
            reason=reason[:256],
            count=count,
            aggregate=aggregate,
            issued_ms=self._clock(),
        )
        return KeyholderResult(
            federation=unsigned.federation,
            round_id=unsigned.round_id,
            request_id=unsigned.request_id,
            status=unsigned.status,
            reason=unsigned.reason,
            count=unsigned.count,
            aggregate=unsigned.aggregate,
            issued_ms=unsigned.issued_ms,
            signature=self.identity.sign(unsigned.signed_bytes()),
        )


class KeyholderVerifier:
    """The aggregator's check of a key holder result: signature and request match.

    Args:
        public_key: the key holder's raw Ed25519 public key, or None to
            accept unsigned results (in-process key holder only).
    """

    def __init__(self, public_key: bytes | None) -> None:
        """Create the verifier."""
        self.public_key = public_key

    def verify(self, result: KeyholderResult) -> None:
        """Raise :class:`InvalidSignatureError` when the signature does not verify."""
        if self.public_key is None:
            return
        verify_signature(self.public_key, result.signed_bytes(), result.signature)
