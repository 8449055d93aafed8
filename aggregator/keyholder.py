"""A key-holder committee member: verifies on its own, then releases a decryption share.

Trust model. The secret key exists only as ``N`` threshold shares; this
member holds one (:class:`aggregator.threshold.HolderShare`). It assumes
nothing of the aggregator or the broker, and it never sees a plaintext: it
releases ``c^(2*Delta*s_i)`` for the requested sum with a proof of
correctness, and the sum becomes readable only when ``T`` members did so.

Before it releases anything, a member checks on its own (sans-io: the
service feeds it bytes):

* the witness: it watches the devices' updates read-only (``updates/+``),
  checks each one's chunks against its topic, its signature against the
  member's OWN registry, and its binding proof when the federation has a
  committee base (:mod:`edge_sdk.crypto.binding`), and keeps at most
  ``witness_rounds`` updates per device (one per round; the first wins, a
  different second one is equivocation). A bogus, forged, future-round or
  oversized message changes nothing but a counter, and one device can only
  ever occupy its own bounded slots;
* the request: federation, packing spec and key, the noise spec (every
  contributor's privacy digest must be the request's, and the quorum the
  noise was calibrated for must be met), one proof per device, each signed
  by an enrolled device, at least its own ``min_clients`` contributors, and
  that the encrypted sum is the product of exactly those devices' own
  witnessed ciphertexts (a single device's ciphertext, a sum over another
  device list, or an earlier round's sum is refused);
* one sum per round: a second, different request for a round it answered is
  refused (otherwise two sums differing by one device reveal that device).
  The identical request is answered again (an aggregator that crashed
  re-asks).

Refusals are signed and carry a reason; the aggregator logs them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import msgpack

from aggregator.committee import (
    CommitteeManifest,
    commit_quorum,
    request_digest,
    share_context,
)
from aggregator.intake import UpdateIntake
from aggregator.threshold import HolderShare, decryption_share
from edge_sdk.crypto import (
    CiphertextVector,
    PackingSpec,
    sum_ciphertexts,
)
from edge_sdk.errors import (
    CryptoError,
    DecodeError,
    InvalidCiphertextError,
    InvalidSignatureError,
    RemoteProtocolError,
)
from edge_sdk.extras import check_slots
from edge_sdk.identity import DeviceIdentity, DeviceRegistry, verify_signature
from edge_sdk.pipeline import noise_digest, verify_update_binding
from edge_sdk.policy import FederationPolicy
from edge_sdk.privacy import NoiseSpec
from edge_sdk.protocol import (
    ContributorProof,
    EncryptedUpdate,
    KeyholderCommit,
    KeyholderRequest,
    KeyholderResult,
    WitnessGap,
)
from edge_sdk.protocol.limits import MAX_UPDATE_BYTES
from edge_sdk.protocol.messages import MAX_GAP_DEVICES

__all__ = ["BindingCheck", "KeyHolder", "Refusal", "exchange"]

log = logging.getLogger("edgefl.keyholder")

#: Checks an update's binding proof; raises on a bad one (see edge_sdk.crypto.binding).
BindingCheck = Callable[[EncryptedUpdate], None]


class Refusal(Exception):
    """Why a request is refused (``reason`` goes into the result)."""

    def __init__(self, reason: str) -> None:
        """Create the refusal."""
        super().__init__(reason)
        self.reason = reason


#: The witness's outcome names for the intake's refusals.
_WITNESS_REASONS = {"federation": "topic_mismatch", "wrong_stream": "topic_mismatch"}


def _witness_reason(reason: str) -> str:
    if reason.startswith(("decode_", "chunk_")):
        return reason.split("_", 1)[0]
    return _WITNESS_REASONS.get(reason, reason)


class KeyHolder:
    """One committee member (no I/O): witness updates, check requests, answer with a share.

    Args:
        share: this member's threshold share.
        manifest: the committee's public manifest (this member is in it).
        registry: the member's own copy of the device registry.
        holder_id: this member's id in the manifest.
        identity: Ed25519 identity signing results (its public key is the
            manifest's entry for ``holder_id``).
        min_clients: its own quorum; requests with fewer distinct
            contributors are refused whatever the aggregator claims.
        binding_check: verifies an update's binding proof; None only for
            federations without binding (then copies and cancellations are
            not defended: development mode).
        witness_rounds: updates kept per device (one per round).
        max_update_bytes: largest update payload the witness reassembles.
        policy: the federation policy (signed by the committee): the noise of
            every request must be inside it, sums have at least its quorum,
            updates must carry binding proofs over its DJN base, and devices
            count only with the committee's approval of their enrollment.
        verify_sums: rebuild every requested sum from witnessed updates (the
            default, and the only setting of a real committee member). False
            is for ``inprocess-insecure-dev`` only, where the members share
            the aggregator's process and so cannot witness anything it does
            not show them.
        on_stored: called with each newly stored update (and its encoded
            bytes) before :meth:`witness` returns: the service persists it
            there, so a restarted member still has what it witnessed.
        workers: processes for the sum check and the share (None: the
            library default, all cores for large sums; 1: this process only).
        clock: milliseconds since the epoch (injected for tests).
    """

    def __init__(
        self,
        share: HolderShare,
        manifest: CommitteeManifest,
        registry: DeviceRegistry,
        *,
        holder_id: str,
        identity: DeviceIdentity,
        min_clients: int,
        binding_check: BindingCheck | None = None,
        witness_rounds: int = 2,
        max_update_bytes: int = MAX_UPDATE_BYTES,
        verify_sums: bool = True,
        policy: FederationPolicy | None = None,
        on_stored: Callable[[EncryptedUpdate, bytes], None] | None = None,
        workers: int | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """Create the member (no I/O).

        Raises:
            ValueError: the share, identity, manifest or policy do not belong together.
        """
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        info = manifest.holder(holder_id)
        if info is None:
            raise ValueError(f"{holder_id!r} is not a member of the committee")
        if info.index != share.index:
            raise ValueError(
                f"{holder_id} has index {info.index} in the manifest, the share {share.index}"
            )
        if info.public_key != identity.public_key_bytes:
            raise ValueError(f"{holder_id}: identity key is not the manifest's")
        if witness_rounds < 1:
            raise ValueError(f"witness_rounds must be >= 1, got {witness_rounds}")
        self.share = share
        self.manifest = manifest
        self.public_key = manifest.public.public_key
        if self.public_key.fingerprint != manifest.key_fingerprint:
            raise ValueError("the committee's threshold key is not the manifest's Paillier key")
        if policy is not None:
            try:
                policy.verify()
            except InvalidSignatureError as exc:
                raise ValueError(f"federation policy: {exc}") from None
            if (
                policy.committee_fingerprint != manifest.fingerprint
                or policy.key_fingerprint != manifest.key_fingerprint
                or policy.federation != manifest.federation
            ):
                raise ValueError("the federation policy is for another committee or key")
            if binding_check is None and policy.djn_base is not None:
                base, pk = policy.djn_base, self.public_key
                binding_check = lambda u: verify_update_binding(u, pk, base)  # noqa: E731
            registry.require_approvals(
                {h.holder_id: h.public_key for h in manifest.holders}, manifest.threshold
            )
        self.policy = policy
        self.registry = registry
        self.federation = manifest.federation
        self.holder_id = holder_id
        self.identity = identity
        self.min_clients = min_clients
        self.binding_check = binding_check
        self.witness_rounds = witness_rounds
        self.max_update_bytes = max_update_bytes
        self.verify_sums = verify_sums
        self.on_stored = on_stored
        self.workers = workers
        self._clock = clock or (lambda: int(time.time() * 1000))
        self._fingerprint = bytes.fromhex(self.public_key.fingerprint)
        # round -> digest of the one request answered for it
        self._answered: dict[int, bytes] = {}
        # the commit phase: round -> member -> digest; our pending request; released results
        self._commits: dict[int, dict[str, bytes]] = {}
        self._pending: dict[int, tuple[KeyholderRequest, int]] = {}
        self._released: dict[int, KeyholderResult] = {}
        # device -> round -> (ciphertext digest, blob): bounded per device
        self._seen: dict[str, OrderedDict[int, tuple[bytes, bytes]]] = {}
        # Only enrolled devices get reassembly state: bounds it by the registry.
        self._intake = UpdateIntake(
            self.federation,
            max_update_bytes=max_update_bytes,
            admit=lambda device: None if self.registry.is_active(device) else "unknown_device",
            any_shard=True,
        )
        self.counters: dict[str, int] = {}

    # -- persistence -----------------------------------------------------------

    def answered_rounds(self) -> dict[int, bytes]:
        """Rounds answered so far and their request digests (for persistence)."""
        return dict(self._answered)

    def restore_answered(self, answered: Mapping[int, bytes]) -> None:
        """Reload the rounds answered before a restart."""
        self._answered.update(answered)

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- the witness -------------------------------------------------------------

    def witness(self, topic: str, payload: bytes) -> str:
        """Take one message seen on a device's update topic.

        Returns:
            What happened: ``stored``, ``partial`` (a chunk of a larger
            update), ``duplicate``, or the reason it was ignored.
        """
        outcome = self._witness(topic, payload)
        self._count(f"witness_{outcome}")
        return outcome

    def _witness(self, topic: str, payload: bytes) -> str:
        got = self._intake.add(topic, payload)
        if got.reason:
            return _witness_reason(got.reason)
        assert got.update is not None
        outcome = self._witness_update(got.update)
        if outcome == "stored" and self.on_stored is not None:
            self.on_stored(got.update, got.payload)
        return outcome

    def witness_relayed(self, sender: str, payload: bytes) -> str:
        """Take one whole update relayed by the aggregator (``keyholder/relay``).

        Exactly the checks of a broker-delivered update (enrolled device, its
        signature, the binding, one update per device and round), so a
        relayed update is worth what the device signed, never what the
        aggregator says. ``sender`` is the chunks' sender and must be the
        update's device.

        Returns:
            What happened, as :meth:`witness`.
        """
        try:
            update = EncryptedUpdate.from_bytes(payload, max_size=self.max_update_bytes)
        except DecodeError:
            outcome = "relay_decode"
        else:
            if update.device_id != sender:
                outcome = "relay_sender"
            else:
                outcome = self._witness_update(update)
                if outcome == "stored" and self.on_stored is not None:
                    self.on_stored(update, payload)
        self._count(f"witness_{outcome}")
        return outcome

    def gap_notice(self, request: KeyholderRequest) -> WitnessGap | None:
        """A signed notice naming the request's contributors this member never saw.

        None when nothing is missing (or the request is malformed: the
        checks refuse it). Lists at most :data:`MAX_GAP_DEVICES` devices.
        """
        devices = self._unseen(request)[:MAX_GAP_DEVICES]
        if not devices:
            return None
        unsigned = WitnessGap(
            federation=self.federation,
            round_id=request.round_id,
            request_id=request.request_id,
            holder_id=self.holder_id,
            devices=tuple(devices),
            issued_ms=self._clock(),
        )
        return dataclasses.replace(unsigned, signature=self.identity.sign(unsigned.signed_bytes()))

    def witness_update(self, update: EncryptedUpdate) -> str:
        """Take one whole update (a restarted member reloading what it had stored).

        Returns:
            What happened, as :meth:`witness`.
        """
        outcome = self._witness_update(update)
        self._count(f"witness_{outcome}")
        return outcome

    def _witness_update(self, update: EncryptedUpdate) -> str:
        device = update.device_id
        if not self.registry.is_active(device):
            return "unknown_device"
        if update.federation != self.federation:
            return "topic_mismatch"
        if update.key_fingerprint != self._fingerprint:
            return "wrong_key"
        answered = max(self._answered, default=-1)
        if update.round_id <= answered:
            return "old_round"
        slots = self._seen.get(device)
        if slots is not None:
            known = slots.get(update.round_id)
            if known is not None:
                return "duplicate" if known[0] == update.ciphertext_digest else "equivocation"
        try:
            self.registry.verify(device, update.signing_bytes(), update.signature)
        except InvalidSignatureError:
            return "bad_signature"
        if self.binding_check is not None:
            try:
                self.binding_check(update)
            except (CryptoError, DecodeError, ValueError):
                return "bad_binding"
        if slots is None:
            slots = OrderedDict()
            self._seen[device] = slots
        slots[update.round_id] = (update.ciphertext_digest, update.ciphertexts)
        # Keep the device's highest rounds only: a device pushing bogus future
        # rounds can only push out its own updates, never another device's.
        for old in sorted(slots)[: max(0, len(slots) - self.witness_rounds)]:
            del slots[old]
        return "stored"

    def witnessed_count(self) -> int:
        """How many updates the witness holds (all devices, all kept rounds)."""
        return sum(len(slots) for slots in self._seen.values())

    def _forget_through(self, round_id: int) -> None:
        for slots in self._seen.values():
            for old in [r for r in slots if r <= round_id]:
                del slots[old]

    def witnessed(self, device_id: str, round_id: int) -> bytes | None:
        """The ciphertext digest witnessed for a device and round, if any."""
        slot = self._slot(device_id, round_id)
        return None if slot is None else slot[0]

    def _slot(self, device_id: str, round_id: int) -> tuple[bytes, bytes] | None:
        slots = self._seen.get(device_id)
        return None if slots is None else slots.get(round_id)

    def missing(self, request: KeyholderRequest) -> int:
        """How many of the request's contributors' updates were not witnessed yet.

        Zero for the request this member already committed to (its updates
        were verified then, and forgotten).
        """
        return len(self._unseen(request))

    def _unseen(self, request: KeyholderRequest) -> list[str]:
        """The request's contributors whose listed update this member has not witnessed."""
        if not self.verify_sums or self._answered.get(request.round_id) == request_digest(request):
            return []
        try:
            proofs = request.proofs()
        except DecodeError:
            return []  # the checks refuse it
        return [
            p.device_id
            for p in proofs
            if self.witnessed(p.device_id, p.round_id) != p.ciphertext_digest
        ]

    # -- requests ----------------------------------------------------------------

    @property
    def commit_quorum(self) -> int:
        """Commitments to one digest needed before a share is released: ``ceil((N + T) / 2)``.

        Any two sets of that size share at least ``T`` members; with fewer
        than ``T`` dishonest members, one honest member is in both, and it
        commits to one digest per round: two different sums of a round can
        never both reach the quorum.
        """
        return commit_quorum(self.manifest.size, self.manifest.threshold)

    def handle(self, request: KeyholderRequest) -> KeyholderResult | KeyholderCommit:
        """Check ``request``; commit to it, and answer with a share once the commit quorum holds.

        Returns:
            A signed refusal; or this member's signed :class:`KeyholderCommit`
            (publish it to the other members; the share follows from
            :meth:`receive_commit` once :attr:`commit_quorum` members committed
            to the same request); or the signed result with the share when the
            quorum is already there. Never raises for a bad request.
        """
        count = 0
        try:
            key = request_digest(request)
            previous = self._answered.get(request.round_id)
            if previous is not None and previous != key:
                raise Refusal("round_already_decrypted")
            if previous == key and request.round_id in self._pending:
                # A re-ask of the request this member checked in full and
                # committed to (same digest: same round, spec, noise,
                # contributors and sum): its proofs are not verified again
                # (at 10,000 contributors that is 10,000 signatures per re-ask).
                self._count("reask")
                own = self._commit(request.round_id, key)
                return self._release(request.round_id) or own
            spec, proofs = self._check(request)
            count = len(proofs)
            if previous is None and self.verify_sums:
                self._verify_sum(request, proofs)
            try:
                CiphertextVector.from_bytes(
                    request.encrypted_sum,
                    self.public_key,
                    spec.num_plaintexts(proofs[0].num_params),
                )
            except InvalidCiphertextError as exc:
                raise Refusal(f"sum_{exc.reason}") from None
        except Refusal as refusal:
            self._count(refusal.reason)
            log.warning(
                "%s: round %s refused: %s", self.holder_id, request.round_id, refusal.reason
            )
            return self._result(request, "refused", refusal.reason, count)
        # Commit before anything leaves: the service persists the answered
        # state before publishing, so a restarted member commits to this same
        # request only, and never to another sum of this round.
        self._answered[request.round_id] = key
        self._forget_through(request.round_id)
        self._pending[request.round_id] = (request, count)
        own = self._commit(request.round_id, key)
        self._commits.setdefault(request.round_id, {})[self.holder_id] = key
        return self._release(request.round_id) or own

    def receive_commit(self, commit: KeyholderCommit) -> KeyholderResult | None:
        """Take another member's commitment; the share once the quorum for our request holds.

        A commitment from a non-member, with a bad signature, or a second,
        different one from the same member for a round (equivocation) changes
        nothing but a counter.
        """
        info = self.manifest.holder(commit.holder_id)
        if info is None or commit.federation != self.federation:
            self._count("commit_foreign")
            return None
        try:
            verify_signature(info.public_key, commit.signed_bytes(), commit.signature)
        except InvalidSignatureError:
            self._count("commit_bad_signature")
            return None
        round_commits = self._commits.setdefault(commit.round_id, {})
        known = round_commits.get(commit.holder_id)
        if known is not None and known != commit.request_digest:
            self._count("commit_equivocation")
            log.warning(
                "%s: %s committed to two requests in round %d",
                self.holder_id,
                commit.holder_id,
                commit.round_id,
            )
            return None
        round_commits[commit.holder_id] = commit.request_digest
        for old in sorted(self._commits)[:-8]:  # bounded: recent rounds only
            del self._commits[old]
        return self._release(commit.round_id)

    def own_commit(self, round_id: int) -> KeyholderCommit | None:
        """This member's commitment for a round (to re-publish on a re-ask), if any."""
        key = self._answered.get(round_id)
        return None if key is None else self._commit(round_id, key)

    def _commit(self, round_id: int, key: bytes) -> KeyholderCommit:
        unsigned = KeyholderCommit(
            federation=self.federation,
            round_id=round_id,
            holder_id=self.holder_id,
            request_digest=key,
            issued_ms=self._clock(),
        )
        return dataclasses.replace(unsigned, signature=self.identity.sign(unsigned.signed_bytes()))

    def _release(self, round_id: int) -> KeyholderResult | None:
        done = self._released.get(round_id)
        if done is not None:
            return done
        pending = self._pending.get(round_id)
        if pending is None:
            return None
        request, count = pending
        key = self._answered.get(round_id)
        agreeing = sum(1 for d in self._commits.get(round_id, {}).values() if d == key)
        if agreeing < self.commit_quorum:
            return None
        vector = CiphertextVector.from_bytes(
            request.encrypted_sum,
            self.public_key,
            len(request.encrypted_sum) // (self.public_key.ciphertext_bytes),
        )
        share = decryption_share(
            self.share, vector.values, context=share_context(request), workers=self.workers
        )
        self._count("ok")
        result = self._result(request, "ok", "", count, share.to_bytes(self.manifest.public))
        self._released[round_id] = result
        for old in sorted(self._released)[:-4]:
            del self._released[old]
            self._pending.pop(old, None)
        return result

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
        quorum = self.min_clients
        noise: NoiseSpec | None = None
        if request.privacy:
            try:
                raw = msgpack.unpackb(request.privacy, raw=False, strict_map_key=True)
                noise = NoiseSpec.from_dict(raw)
            except Exception:
                raise Refusal("bad_noise_spec") from None
            # The noise each device added was sized for sums of noise.min_clients;
            # a smaller sum would carry less noise than every ledger charged for.
            quorum = max(quorum, noise.min_clients)
        try:
            check_slots(spec.extras, noise, value_max=spec.value_max)
        except ValueError:
            raise Refusal("bad_extra_slots") from None
        if self.policy is not None:
            try:
                self.policy.check_noise(noise, value_bits=spec.value_bits, extras=spec.extras)
            except RemoteProtocolError:
                raise Refusal("outside_policy") from None
            quorum = max(quorum, self.policy.quorum(noise))
        privacy_digest = noise_digest(request.privacy)
        try:
            proofs = list(request.proofs())
        except DecodeError:
            raise Refusal("bad_proofs") from None
        if not proofs:
            raise Refusal("quorum")
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
            if proof.privacy_digest != privacy_digest:
                raise Refusal("noise_mismatch")
            if proof.num_params != proofs[0].num_params:
                raise Refusal("proof_mismatch")
            if noise is not None and proof.num_params != noise.dimension + len(spec.extras):
                raise Refusal("proof_mismatch")
            if proof.num_ciphertexts != spec.num_plaintexts(proof.num_params):
                raise Refusal("proof_mismatch")
            try:
                self.registry.verify(proof.device_id, proof.signing_bytes(), proof.signature)
            except InvalidSignatureError as exc:
                raise Refusal(f"proof_{exc.reason}") from None
        if len(proofs) < quorum:
            raise Refusal("quorum")
        if len(proofs) > spec.max_contributors:
            raise Refusal("too_many_contributors")
        return spec, proofs

    def _verify_sum(self, request: KeyholderRequest, proofs: list[ContributorProof]) -> None:
        vectors = []
        for proof in proofs:
            slot = self._slot(proof.device_id, proof.round_id)
            if slot is None or slot[0] != proof.ciphertext_digest:
                raise Refusal("verify_ciphertext_missing")
            try:
                vectors.append(
                    CiphertextVector.from_bytes(slot[1], self.public_key, proof.num_ciphertexts)
                )
            except InvalidCiphertextError:
                raise Refusal("verify_ciphertext_invalid") from None
        total = sum_ciphertexts(self.public_key, vectors, workers=self.workers)
        if total.to_bytes() != request.encrypted_sum:
            raise Refusal("verify_sum_mismatch")

    def _result(
        self,
        request: KeyholderRequest,
        status: str,
        reason: str,
        count: int,
        share: bytes = b"",
    ) -> KeyholderResult:
        unsigned = KeyholderResult(
            federation=request.federation,
            round_id=request.round_id,
            request_id=request.request_id,
            holder_id=self.holder_id,
            status=status,
            reason=reason[:256],
            count=count,
            share=share,
            issued_ms=self._clock(),
        )
        return KeyholderResult(
            federation=unsigned.federation,
            round_id=unsigned.round_id,
            request_id=unsigned.request_id,
            holder_id=unsigned.holder_id,
            status=unsigned.status,
            reason=unsigned.reason,
            count=unsigned.count,
            share=unsigned.share,
            issued_ms=unsigned.issued_ms,
            signature=self.identity.sign(unsigned.signed_bytes()),
        )


def exchange(members: Sequence[KeyHolder], request: KeyholderRequest) -> list[KeyholderResult]:
    """Run one request through in-process members, commit phase included (simulation, tests).

    Every member handles the request; each commitment is delivered to every
    other member, as the broker would; returns each member's final answer
    (its share, or its refusal; nothing for a member still waiting).
    """
    answers: dict[str, KeyholderResult] = {}
    commits: list[KeyholderCommit] = []
    for member in members:
        out = member.handle(request)
        if isinstance(out, KeyholderCommit):
            commits.append(out)
        else:
            answers[member.holder_id] = out
    for commit in commits:
        for member in members:
            if member.holder_id == commit.holder_id:
                continue
            result = member.receive_commit(commit)
            if result is not None:
                answers[member.holder_id] = result
    for member in members:  # a member whose quorum came with its own commit
        done = member._released.get(request.round_id)
        if done is not None and member.holder_id not in answers:
            answers[member.holder_id] = done
    return [answers[m.holder_id] for m in members if m.holder_id in answers]
