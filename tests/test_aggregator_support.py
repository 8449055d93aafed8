"""Shared helpers for the aggregator and key holder tests (real 2048-bit keys)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.keyholder import KeyHolder, KeyholderVerifier
from aggregator.optimizers import FedAvg, ServerOptimizer
from aggregator.planning import RoundPlan, plan_rounds
from aggregator.rounds import RoundConfig, RoundMachine
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey, generate_keypair
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, build_update
from edge_sdk.protocol import EncryptedUpdate, RoundAnnouncement, Topics, split_payload
from edge_sdk.randomness import DeterministicRandom

FED = "testfed"


@pytest.fixture(scope="session")
def keypair() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """One real 2048-bit Paillier key pair for the whole session."""
    return generate_keypair(2048)


@dataclass
class Fleet:
    """Enrolled device identities and the registry that knows them."""

    identities: dict[str, DeviceIdentity]
    registry: DeviceRegistry

    @classmethod
    def create(cls, n: int, path: Path) -> Fleet:
        registry = DeviceRegistry(path, FED)
        identities = {}
        for i in range(n):
            ident = DeviceIdentity.generate(f"dev{i:02d}")
            registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
            identities[ident.device_id] = ident
        return cls(identities, registry)

    def ids(self) -> list[str]:
        return sorted(self.identities)


def make_update(
    ann: RoundAnnouncement,
    public_key: PaillierPublicKey,
    identity: DeviceIdentity,
    delta: npt.NDArray[np.float64],
    *,
    seed: int = 0,
    now_ms: int = 1_000,
) -> tuple[EncryptedUpdate, npt.NDArray[np.int64]]:
    """A real device update (deterministic randomness) and its integer values."""
    ctx = RoundContext.from_announcement(ann, public_key)
    clip = None if ctx.noise is not None else float(ann.train_config().get("clip", 1.0))
    rng = DeterministicRandom(seed.to_bytes(8, "big") + identity.device_id.encode())
    update, private = build_update(
        delta, ctx, identity, clip=clip, rng=rng, allow_insecure_rng=True, now_ms=now_ms
    )
    return update, private.values


def update_messages(
    update: EncryptedUpdate, *, topic_device: str | None = None, max_message_size: int = 128 * 1024
) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) pairs of an update's chunks on its device's topic."""
    device = topic_device or update.device_id
    for chunk in split_payload(
        update.to_bytes(),
        federation=update.federation,
        stream="update",
        sender=device,
        round_id=update.round_id,
        max_message_size=max_message_size,
    ):
        yield Topics(update.federation).updates(device), chunk.to_bytes()


def make_plan(
    public_key: PaillierPublicKey,
    *,
    dim: int = 40,
    min_clients: int = 3,
    max_contributors: int = 16,
    clip: float = 1.0,
) -> RoundPlan:
    return plan_rounds(
        public_key,
        dimension=dim,
        max_contributors=max_contributors,
        min_clients=min_clients,
        clip=clip,
    )


def make_machine(
    public_key: PaillierPublicKey,
    fleet: Fleet,
    *,
    dim: int = 40,
    min_clients: int = 3,
    target: int = 4,
    duration_ms: int = 60_000,
    rounds: int = 0,
    optimizer: ServerOptimizer | None = None,
    keyholder_key: bytes | None = None,
    **config: Any,
) -> RoundMachine:
    plan = make_plan(public_key, dim=dim, min_clients=min_clients)
    cfg = RoundConfig(
        federation=FED,
        min_clients=min_clients,
        target_clients=target,
        round_duration_ms=duration_ms,
        rounds=rounds,
        **config,
    )
    return RoundMachine(
        cfg,
        plan,
        fleet.registry,
        optimizer or FedAvg(),
        initial_weights=np.zeros(dim, dtype=np.float32),
        keyholder=KeyholderVerifier(keyholder_key),
    )


def make_keyholder(
    private_key: PaillierPrivateKey, fleet: Fleet, *, min_clients: int = 3
) -> KeyHolder:
    return KeyHolder(
        private_key,
        fleet.registry,
        federation=FED,
        min_clients=min_clients,
        identity=DeviceIdentity.generate("keyholder"),
        clock=lambda: 5_000,
    )


def deltas(n: int, dim: int, seed: int = 7) -> list[npt.NDArray[np.float64]]:
    """Small deterministic deltas (norm < 1, so no clipping)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = rng.normal(0.0, 0.02, dim)
        out.append(d)
    return out
