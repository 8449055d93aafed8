"""Run a key-holder committee as real processes (``edgefl keyholder serve``), one per member.

Used by the fleet, the demo and the tests: each member is its own Python
process with its own MQTT connection, state file and share, exactly as an
operator runs it from the folder ``edgefl keys ceremony`` wrote. A member can
be stopped, killed with SIGKILL and restarted on its own, to show that a
round closes with any ``T`` of ``N`` and that a restarted member loses
nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from aggregator.committee import CommitteeManifest, CommitteeVerifier, HolderInfo
from aggregator.keyholder import KeyHolder
from aggregator.keyholder_config import PolicyTerms
from aggregator.threshold import Ceremony, ceremony
from edge_sdk.crypto import DJNBase, PaillierPublicKey
from edge_sdk.errors import EdgeFLError
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.policy import FederationPolicy

__all__ = ["CommitteeProcesses", "InMemoryCommittee", "MemberProcess"]


class MemberProcess:
    """One ``edgefl keyholder serve`` process.

    Args:
        config: the member's ``keyholder.toml``.
        env: extra environment (e.g. ``EDGEFL_KEY_PASSPHRASE``).
    """

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        """Describe the process (:meth:`start` runs it)."""
        self.config = Path(config)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The member's folder name (its id as the ceremony wrote it)."""
        return self.config.parent.name

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Start the member and wait until it is subscribed and serving.

        Raises:
            EdgeFLError: it exited or did not come up in time (its output is in the message).
        """
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._ready.clear()
        self.lines = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aggregator",
                "keyholder",
                "serve",
                "--config",
                str(self.config),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-out", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = "".join(self.lines[-20:])
                self.kill()
                raise EdgeFLError(f"key holder {self.name} did not start:\n{out}")

    def _read(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            if len(self.lines) > 2000:
                del self.lines[:1000]
            if " serving federation " in line:
                self._ready.set()

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (a power loss of the member's machine)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=10)


class CommitteeProcesses:
    """The ``N`` members of a ceremony folder, as processes.

    Args:
        members: each member's ``keyholder.toml``.
        env: extra environment for every member.
    """

    def __init__(self, members: Sequence[Path], *, env: dict[str, str] | None = None) -> None:
        """Describe the committee (:meth:`start` runs it)."""
        self.members = [MemberProcess(Path(m), env=env) for m in members]

    @classmethod
    def from_ceremony(
        cls, folder: Path, *, env: dict[str, str] | None = None
    ) -> CommitteeProcesses:
        """Every ``keyholder-*/keyholder.toml`` under a ceremony folder."""
        configs = sorted(Path(folder).glob("*/keyholder.toml"))
        if not configs:
            raise EdgeFLError(f"no keyholder.toml under {folder}")
        return cls(configs, env=env)

    def start(self, *, only: Sequence[int] | None = None, timeout_s: float = 60.0) -> None:
        """Start every member (or those at the given 0-based positions), in parallel."""
        chosen = [m for i, m in enumerate(self.members) if only is None or i in only]
        errors: list[BaseException] = []

        def run(member: MemberProcess) -> None:
            try:
                member.start(timeout_s=timeout_s)
            except BaseException as exc:  # collected and re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(m,)) for m in chosen]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]

    def stop(self) -> None:
        """Stop every member."""
        for member in self.members:
            member.stop()

    def __enter__(self) -> CommitteeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InMemoryCommittee:
    """A T-of-N committee whose members run in this process (simulation and tests).

    The ceremony is the real one (safe primes, real shares, real proofs); only
    the transport is missing. Members built by :meth:`members` witness what
    the caller feeds them, exactly like a member process does with what the
    broker delivers.

    Args:
        federation: the federation.
        bits: modulus size.
        holders: ``N``.
        threshold: ``T``.
        primes: known safe primes (tests); generated otherwise.
        allow_insecure_size: allow moduli below 2048 bits (tests).
    """

    _cache: ClassVar[dict[tuple[int, int, int, tuple[int, int] | None], Ceremony]] = {}
    _bases: ClassVar[dict[str, DJNBase]] = {}

    def __init__(
        self,
        federation: str,
        *,
        bits: int = 2048,
        holders: int = 3,
        threshold: int = 2,
        primes: tuple[int, int] | None = None,
        allow_insecure_size: bool = False,
    ) -> None:
        """Run (or reuse, within this process) the ceremony and name the members."""
        key = (bits, holders, threshold, primes)
        cached = self._cache.get(key)
        if cached is None:
            cached = ceremony(
                bits,
                holders=holders,
                threshold=threshold,
                primes=primes,
                allow_insecure_size=allow_insecure_size,
            )
            self._cache[key] = cached
        self.ceremony = cached
        self.identities = [DeviceIdentity.generate(f"keyholder-{i}") for i in range(1, holders + 1)]
        self.manifest = CommitteeManifest(
            federation=federation,
            key_fingerprint=cached.public_key.fingerprint,
            public=cached.committee,
            holders=tuple(
                HolderInfo(holder_id=ident.device_id, index=i, public_key=ident.public_key_bytes)
                for i, ident in enumerate(self.identities, start=1)
            ),
        )

    @property
    def public_key(self) -> PaillierPublicKey:
        """The federation's Paillier public key."""
        return self.ceremony.public_key

    def verifier(self) -> CommitteeVerifier:
        """The aggregator's verifier for this committee."""
        return CommitteeVerifier(self.manifest)

    def policy(self, terms: PolicyTerms | None = None) -> FederationPolicy:
        """A federation policy for this committee, signed by every member.

        The DJN base is drawn once per ceremony (in this process) and reused.
        """
        terms = terms or PolicyTerms()
        base = None
        if terms.binding:
            base = self._bases.get(self.ceremony.committee.fingerprint)
            if base is None:
                base = DJNBase.generate(self.public_key)
                self._bases[self.ceremony.committee.fingerprint] = base
        policy = FederationPolicy(
            federation=self.manifest.federation,
            key_fingerprint=self.manifest.key_fingerprint,
            committee_fingerprint=self.manifest.fingerprint,
            threshold=self.manifest.threshold,
            holders=tuple((h.holder_id, h.public_key) for h in self.manifest.holders),
            mode=terms.mode,
            min_clients=terms.min_clients if terms.mode == "distributed" else 1,
            epsilon=terms.epsilon,
            delta=terms.delta,
            rounds=terms.rounds,
            max_clip=terms.max_clip,
            min_clip=terms.min_clip,
            adaptive_clip=terms.adaptive_clip,
            djn_base=base,
        )
        for ident in self.identities:
            policy = policy.signed_by(ident)
        return policy

    def approve_all(self, registry: DeviceRegistry) -> None:
        """Every member approves every active device of ``registry`` (a simulation shortcut)."""
        for device_id in registry.active_ids():
            for ident in self.identities:
                registry.approve(device_id, ident)

    def members(
        self, registry: DeviceRegistry, *, min_clients: int, **kwargs: Any
    ) -> list[KeyHolder]:
        """Fresh members, one per share, each with ``registry`` as its own view."""
        return [
            KeyHolder(
                share,
                self.manifest,
                registry,
                holder_id=ident.device_id,
                identity=ident,
                min_clients=min_clients,
                **kwargs,
            )
            for share, ident in zip(self.ceremony.shares, self.identities, strict=True)
        ]
