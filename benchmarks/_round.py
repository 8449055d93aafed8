"""Shared set-up of the round benchmarks: one round of many devices, mostly synthetic.

Encrypting a 50k-parameter update costs seconds, so ONE real update is
produced by the device pipeline (pack + encrypt); every other device's
ciphertext vector is a rotation of that one (every element is a genuine
ciphertext, so validation, summation and decryption do the same work, and
the slot sums stay in range), and every update is signed by its own
enrolled device. Not a benchmark itself (leading underscore).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.optimizers import FedAvg
from aggregator.planning import RoundPlan, plan_rounds
from aggregator.rounds import RoundConfig, RoundMachine, Start
from edge_sdk.crypto import CiphertextVector, DJNBase, DJNObfuscatorSource, pack
from edge_sdk.crypto.binding import binding_context, ciphertext_digest, prove
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, seal
from edge_sdk.policy import FederationPolicy
from edge_sdk.protocol import EncryptedUpdate, Topics, digest, split_payload
from firmware_sim.committee import InMemoryCommittee

FED = "bench"

SYNTHETIC = (
    "1 real encrypted update from the device pipeline; the other devices' ciphertext "
    "vectors are rotations of it, each re-signed by its own enrolled device"
)


def resign(base: EncryptedUpdate, ident: DeviceIdentity, blob: bytes) -> EncryptedUpdate:
    """``base`` with another ciphertext blob, signed by ``ident``."""
    fields = {f: getattr(base, f) for f in base.RULES}
    fields.update(device_id=ident.device_id, ciphertexts=blob, ciphertext_digest=digest(blob))
    unsigned = EncryptedUpdate(**fields)
    fields["signature"] = ident.sign(unsigned.signing_bytes())
    return EncryptedUpdate(**fields)


def _bound_updates(
    ctx: RoundContext, base: DJNBase, values: Any, idents: list[DeviceIdentity]
) -> tuple[list[EncryptedUpdate], int]:
    """One DJN encryption, rotated per device, each rotation proven by its device."""
    pk = ctx.public_key
    ann = ctx.announcement
    plaintexts = pack(values, ctx.packing)
    source = DJNObfuscatorSource(pk, base)
    vector, exponents = source.encrypt(plaintexts)
    cts = list(vector.values)
    ncts = len(cts)
    out = []
    for j, ident in enumerate(idents):
        cut = j % max(ncts - 1, 1)  # the last ciphertext keeps its padding slots

        def rot(xs: list[Any], cut: int = cut) -> list[Any]:
            return xs[cut:-1] + xs[:cut] + xs[-1:]

        rv = CiphertextVector(pk, rot(cts))
        context = binding_context(
            federation=ann.federation,
            round_id=ann.round_id,
            device_id=ident.device_id,
            packing_digest=ann.packing_digest,
            key_fingerprint=pk.fingerprint,
            ciphertext_digest=ciphertext_digest(pk, rv),
        )
        proof = prove(
            pk,
            base,
            rot(list(plaintexts)),
            rot(list(exponents)),
            rv,
            context=context,
            source=source,
        )
        blob = rv.to_bytes()
        header: dict[str, Any] = {
            "federation": ann.federation,
            "round_id": ann.round_id,
            "device_id": ident.device_id,
            "key_fingerprint": ann.key_fingerprint,
            "packing_digest": ann.packing_digest,
            "privacy_digest": ctx.privacy_digest,
            "num_params": int(values.size),
            "num_ciphertexts": ncts,
            "ciphertext_digest": digest(blob),
            "created_ms": 2,
            "binding": proof.to_bytes(),
        }
        unsigned = EncryptedUpdate(**header, ciphertexts=blob, signature=b"\0" * 64)
        out.append(
            EncryptedUpdate(
                **header, ciphertexts=blob, signature=ident.sign(unsigned.signing_bytes())
            )
        )
    return out, ncts


@dataclass
class Round:
    """A machine with its round open and every device's update as chunk messages."""

    committee: InMemoryCommittee
    registry: DeviceRegistry
    plan: RoundPlan
    machine: RoundMachine
    start_actions: list[Any]
    updates: list[EncryptedUpdate]
    messages: list[list[tuple[str, bytes]]]
    encrypt_one_update_s: float
    ciphertexts_per_update: int


def build_round(
    folder: Path,
    *,
    devices: int,
    dim: int,
    min_clients: int,
    committee: InMemoryCommittee | None = None,
    max_contributors: int = 128,
    policy: FederationPolicy | None = None,
) -> Round:
    """Enroll ``devices``, open round 1 and build every device's update.

    With a ``policy`` carrying a DJN base, the one real update is encrypted
    with DJN obfuscators, and every device's rotation of it gets its OWN
    binding proof (the rotated plaintexts and exponents are known), so each
    update is a genuinely bound update of its sender.
    """
    committee = committee or InMemoryCommittee(FED)
    pk = committee.public_key
    width = pk.ciphertext_bytes
    registry = DeviceRegistry(folder / "reg.json", FED)
    idents = [DeviceIdentity.generate(f"d{i:03d}") for i in range(devices)]
    for ident in idents:
        registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
    plan = plan_rounds(
        pk, dimension=dim, max_contributors=max_contributors, min_clients=min_clients, clip=1.0
    )
    config = RoundConfig(
        federation=FED, min_clients=min_clients, target_clients=devices, round_duration_ms=10**9
    )
    base = None if policy is None else policy.djn_base
    if policy is not None:
        committee.approve_all(registry)
        registry.require_approvals(
            {h.holder_id: h.public_key for h in committee.manifest.holders},
            committee.manifest.threshold,
        )
    machine = RoundMachine(
        config,
        plan,
        registry,
        FedAvg(),
        initial_weights=np.zeros(dim, np.float32),
        committee=committee.verifier(),
        binding=base,
    )
    start = machine.handle(Start(now_ms=1))
    ann = machine.announcement
    assert ann is not None
    ctx = RoundContext.from_announcement(ann, pk, policy=policy)
    values = np.random.default_rng(1).integers(-1000, 1000, dim).astype(np.int64)
    t0 = time.perf_counter()
    real = seal(values, ctx, idents[0], now_ms=2)
    encrypt_s = time.perf_counter() - t0
    if base is None:
        blob0 = real.ciphertexts
        ncts = len(blob0) // width

        def rotate(j: int) -> bytes:
            # rotate all but the last ciphertext, whose padding slots must stay zero
            body, last = blob0[:-width], blob0[-width:]
            cut = (j % max(ncts - 1, 1)) * width
            return body[cut:] + body[:cut] + last

        updates = [real] + [resign(real, ident, rotate(j)) for j, ident in enumerate(idents[1:], 1)]
    else:
        updates, ncts = _bound_updates(ctx, base, values, idents)
    messages = [
        [
            (Topics(FED).updates(u.device_id), c.to_bytes())
            for c in split_payload(
                u.to_bytes(), federation=FED, stream="update", sender=u.device_id, round_id=1
            )
        ]
        for u in updates
    ]
    return Round(committee, registry, plan, machine, start, updates, messages, encrypt_s, ncts)


_MEMBERS: list[Any] = []  # set before forking: members hold unpicklable keys


def _member_main(index: int, messages: Any, inbox: Any, commits: Any, answers: Any) -> None:
    from edge_sdk.protocol import KeyholderCommit, KeyholderRequest

    member = _MEMBERS[index]
    t0 = time.perf_counter()
    for msgs in messages:
        for topic, payload in msgs:
            member.witness(topic, payload)
    witness_s = time.perf_counter() - t0
    request = KeyholderRequest.from_bytes(inbox.get(timeout=1800), max_size=1 << 30)
    t1 = time.perf_counter()
    own = member.handle(request)
    assert isinstance(own, KeyholderCommit), own
    commits.put(own.to_bytes())
    result = None
    for blob in inbox.get(timeout=1800):
        got = member.receive_commit(KeyholderCommit.from_bytes(blob))
        result = result or got
    assert result is not None and result.status == "ok"
    answers.put((index, result.to_bytes(), witness_s, time.perf_counter() - t1))


class CommitteeProcesses:
    """Committee members as forked processes: witness, commit phase, shares (benchmarks)."""

    def __init__(self, members: list[Any], messages: Any) -> None:
        """Fork one process per member; each starts witnessing ``messages`` at once."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        _MEMBERS[:] = members
        self.inboxes = [ctx.Queue() for _ in members]
        self.commits, self.answers = ctx.Queue(), ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_member_main,
                args=(i, messages, self.inboxes[i], self.commits, self.answers),
            )
            for i in range(len(members))
        ]
        for proc in self.procs:
            proc.start()

    def decrypt(self, request_bytes: bytes) -> list[tuple[int, bytes, float, float]]:
        """Send the request; relay every commitment to every member; their answers."""
        for inbox in self.inboxes:
            inbox.put(request_bytes)
        commits = [self.commits.get(timeout=1800) for _ in self.procs]
        for inbox in self.inboxes:
            inbox.put(commits)
        got = sorted(self.answers.get(timeout=1800) for _ in self.procs)
        for proc in self.procs:
            proc.join(timeout=60)
        _MEMBERS.clear()
        return got
