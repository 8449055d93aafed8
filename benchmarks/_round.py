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
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, seal
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
) -> Round:
    """Enroll ``devices``, open round 1 and build every device's update."""
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
    machine = RoundMachine(
        config,
        plan,
        registry,
        FedAvg(),
        initial_weights=np.zeros(dim, np.float32),
        committee=committee.verifier(),
    )
    start = machine.handle(Start(now_ms=1))
    ann = machine.announcement
    assert ann is not None
    ctx = RoundContext.from_announcement(ann, pk)
    values = np.random.default_rng(1).integers(-1000, 1000, dim).astype(np.int64)
    t0 = time.perf_counter()
    real = seal(values, ctx, idents[0], now_ms=2)
    encrypt_s = time.perf_counter() - t0
    base = real.ciphertexts
    ncts = len(base) // width

    def rotate(j: int) -> bytes:
        # rotate all but the last ciphertext, whose padding slots must stay zero
        body, last = base[:-width], base[-width:]
        cut = (j % max(ncts - 1, 1)) * width
        return body[cut:] + body[:cut] + last

    updates = [real] + [resign(real, ident, rotate(j)) for j, ident in enumerate(idents[1:], 1)]
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
