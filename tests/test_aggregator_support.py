"""Shared helpers for the aggregator and key holder tests (real 2048-bit keys)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.keyholder import KeyHolder
from aggregator.optimizers import FedAvg, ServerOptimizer
from aggregator.planning import RoundPlan, plan_rounds
from aggregator.rounds import RoundConfig, RoundMachine
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, build_update
from edge_sdk.protocol import EncryptedUpdate, RoundAnnouncement, Topics, split_payload
from edge_sdk.randomness import DeterministicRandom
from firmware_sim.committee import InMemoryCommittee

FED = "testfed"


_KEYS = json.loads((Path(__file__).parent / "vectors" / "crypto_test_keys.json").read_text())
SAFE_PRIMES = (int(_KEYS["safe2048"]["p"]), int(_KEYS["safe2048"]["q"]))


# One implementation of an in-memory committee: the simulator's.
Committee = InMemoryCommittee


def make_committee(holders: int = 3, threshold: int = 2) -> Committee:
    """A T-of-N committee over the test key (ceremony from known safe primes)."""
    return InMemoryCommittee(FED, holders=holders, threshold=threshold, primes=SAFE_PRIMES)


@pytest.fixture(scope="session")
def committee() -> Committee:
    """The session's 2-of-3 committee (real 2048-bit key from safe primes)."""
    return _default_committee()


@pytest.fixture(scope="session")
def keypair() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """The committee's 2048-bit public key, and (tests only) its whole secret key."""
    pk = _default_committee().public_key
    return pk, PaillierPrivateKey(pk, *SAFE_PRIMES)


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
    committee: Committee | None = None,
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
        committee=(committee or _default_committee()).verifier(),
    )


_COMMITTEE: list[Committee] = []


def _default_committee() -> Committee:
    if not _COMMITTEE:
        _COMMITTEE.append(make_committee())
    return _COMMITTEE[0]


def make_keyholders(
    committee: Committee, fleet: Fleet, *, min_clients: int = 3, **kwargs: Any
) -> list[KeyHolder]:
    return committee.members(fleet.registry, min_clients=min_clients, **kwargs)


def deltas(n: int, dim: int, seed: int = 7) -> list[npt.NDArray[np.float64]]:
    """Small deterministic deltas (norm < 1, so no clipping)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = rng.normal(0.0, 0.02, dim)
        out.append(d)
    return out
