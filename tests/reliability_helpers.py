"""Shared pieces of the reliability and security suite (tests/test_reliability_*.py,
tests/test_security_*.py).

* :func:`write_federation`: keys, registry and an ``aggregator.toml`` in a folder,
  exactly as an operator would lay them out (the service is built from the file).
* :class:`ServiceThread`: the real :class:`~aggregator.service.AggregatorService`
  built by ``aggregator.config.build_aggregator`` and pumped on its own thread
  (for tests that break the broker or the link, not the aggregator process).
* :func:`spawn_aggregator`: the aggregator as a subprocess (``EDGEFL_CRASH_AT``).
* :class:`DeviceFleet`: scripted devices (real updates: quantized, encrypted,
  signed) behind a few MQTT connections; each device resends its stored update
  until a receipt names it, as the SDK's agent does.
* :class:`Observer`: records every publication on ``round`` and ``model/+``.

Nothing here asserts on time: waits have generous timeouts and fail loudly.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.config import ServiceConfig, build_aggregator, load_config
from aggregator.keyholder_config import run_ceremony
from aggregator.service import AggregatorService
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey, load_public_key
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.protocol import (
    Chunk,
    EncryptedUpdate,
    GlobalModel,
    Reassembler,
    Receipt,
    RoundAnnouncement,
    Topics,
)
from edge_sdk.transport import InboundMessage, MqttTransport, TransportConfig
from tests.test_aggregator_support import SAFE_PRIMES, make_update, update_messages

REPO = Path(__file__).resolve().parent.parent
FED = "relfed"
WAIT = 60.0


def wait_for(cond: Callable[[], bool], *, timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def delta_for(device_index: int, round_id: int, dim: int) -> npt.NDArray[np.float64]:
    """A small deterministic model delta (norm well below the clip)."""
    rng = np.random.default_rng(10_000 * round_id + device_index)
    return rng.normal(0.0, 0.3 / np.sqrt(dim), dim)


# ------------------------------------------------------------------ files


@dataclass
class Federation:
    """What :func:`write_federation` laid out."""

    folder: Path
    config: Path
    identities: list[DeviceIdentity]
    public_key: PaillierPublicKey
    store: Path

    @property
    def ids(self) -> list[str]:
        """Device ids in enrolment order."""
        return [i.device_id for i in self.identities]


def write_federation(
    folder: Path,
    keys: tuple[PaillierPublicKey, PaillierPrivateKey],
    url: str,
    *,
    devices: int | Iterable[DeviceIdentity],
    dim: int = 10,
    min_clients: int = 3,
    target: int | None = None,
    max_contributors: int = 64,
    rounds: int = 0,
    round_duration_s: float = 600.0,
    client_id: str = "agg-rel",
    transport: dict[str, Any] | None = None,
    holders: int = 3,
) -> Federation:
    """Write a 2-of-3 ceremony, registry and ``aggregator.toml`` (in-process dev committee)."""
    pk, _ = keys
    folder.mkdir(parents=True, exist_ok=True)
    run_ceremony(
        folder / "keys",
        federation=FED,
        holders=holders,
        threshold=2,
        passphrase=None,
        insecure_unencrypted=True,
        min_clients=min_clients,
        primes=SAFE_PRIMES,
        overwrite=True,
    )
    assert load_public_key(folder / "keys" / "paillier_public.json") == pk
    if isinstance(devices, int):
        identities = [DeviceIdentity.generate(f"d{i:04d}") for i in range(devices)]
    else:
        identities = list(devices)
    registry = DeviceRegistry(folder / "registry.json", FED)
    for ident in identities:
        registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
    registry.save()
    extra = "".join(
        f"{k} = {_toml(v)}\n"
        for k, v in {"url": url, "client_id": client_id, **(transport or {})}.items()
    )
    cfg = folder / "aggregator.toml"
    cfg.write_text(
        f"""
[aggregator]
federation = "{FED}"
store = "agg.db"
public_key = "keys/paillier_public.json"
registry = "registry.json"
dimension = {dim}
min_clients = {min_clients}
target_clients = {target if target is not None else len(identities)}
max_contributors = {max_contributors}
round_duration_s = {round_duration_s}
rounds = {rounds}
clip = 1.0
tick_s = 0.1

[committee]
manifest = "keys/committee.json"
mode = "inprocess-insecure-dev"
members = ["keys/keyholder-1", "keys/keyholder-2", "keys/keyholder-3"]
allow_unencrypted_key = true

[broker]
{extra}""",
        encoding="utf-8",
    )
    return Federation(folder, cfg, identities, pk, folder / "agg.db")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value) + '"'


# ------------------------------------------------------------------ aggregator


class ServiceThread:
    """The real aggregator service, built from its config file, pumped on a thread.

    The service is built, started, pumped and closed on that one thread (the
    SQLite store is bound to the thread that opened it), as ``serve`` does.

    Args:
        config: ``aggregator.toml``.
        transport: settings overriding the file's ``[broker]`` table.
    """

    def __init__(self, config: Path, **transport: Any) -> None:
        cfg = load_config(config)
        self._cfg = ServiceConfig(
            cfg.base, cfg.aggregator, cfg.committee, {**cfg.broker, **transport}
        )
        self.service: AggregatorService | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def machine(self) -> Any:
        """The round machine (read counters only; it runs on the pump thread)."""
        assert self.service is not None
        return self.service.machine

    def start(self) -> ServiceThread:
        """Build, restore, connect and re-publish, then pump; wait until started."""
        self._thread = threading.Thread(target=self._run, name="aggregator-pump", daemon=True)
        self._thread.start()
        if not self._ready.wait(60) or self.error is not None:
            self.stop()
        return self

    def _run(self) -> None:
        try:
            self.service = build_aggregator(self._cfg)
            try:
                self.service.start(connect_timeout=30.0)
                self._ready.set()
                while not self._stop.is_set():
                    self.service.pump(timeout=0.05)
            finally:
                self.service.close()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self._ready.set()

    def stop(self) -> None:
        """Stop pumping, close transport and store; re-raise a pump failure."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        if self.error is not None:
            raise AssertionError(f"aggregator pump failed: {self.error!r}") from self.error


def spawn_aggregator(
    config: Path, crash: str | None = None, *, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m aggregator aggregator serve --config ... --exit-when-done`` (crash hook)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(extra_env or {}))
    env.pop("EDGEFL_CRASH_AT", None)
    if crash:
        env["EDGEFL_CRASH_AT"] = crash
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aggregator",
            "aggregator",
            "serve",
            "--config",
            str(config),
            "--exit-when-done",
        ],
        cwd=str(config.parent),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


# ------------------------------------------------------------------ devices


def transport(url: str, client_id: str, **settings: Any) -> MqttTransport:
    """A fast-reconnecting product transport for test clients."""
    values: dict[str, Any] = {
        "url": url,
        "client_id": client_id,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 1.0,
        "connect_timeout": 5.0,
        **settings,
    }
    return MqttTransport(TransportConfig(**values))


@dataclass
class _RoundState:
    updates: dict[str, EncryptedUpdate] = field(default_factory=dict)
    values: dict[str, npt.NDArray[np.int64]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)


class DeviceFleet:
    """Scripted devices behind ``connections`` MQTT clients (no ACL in force).

    On each new announcement (retained ``round``) every participating device
    builds ONE real update (deterministic randomness: the same bytes on every
    resend, as the agent's outbox guarantees) and publishes it; devices without
    an ``accepted``/``duplicate`` receipt resend every ``resend_s`` seconds.

    Args:
        url: broker url (or a fault proxy's).
        public_key: the federation key.
        identities: the devices.
        dim: model dimension.
        connections: MQTT connections to spread the devices over.
        resend_s: resend period for devices without a receipt.
        participate: ``(round_id, device_id) -> bool``; default: always.
        keepalive: MQTT keepalive of the connections.
    """

    def __init__(
        self,
        url: str,
        public_key: PaillierPublicKey,
        identities: list[DeviceIdentity],
        *,
        dim: int,
        connections: int = 1,
        resend_s: float = 2.0,
        participate: Callable[[int, str], bool] | None = None,
        keepalive: int = 60,
        name: str = "fleet",
    ) -> None:
        self.pk = public_key
        self.identities = identities
        self.index = {ident.device_id: i for i, ident in enumerate(identities)}
        self.dim = dim
        self.resend_s = resend_s
        self.participate = participate or (lambda r, d: True)
        self.topics = Topics(FED)
        self.transports = [
            transport(url, f"{name}-{j}", keepalive=keepalive) for j in range(connections)
        ]
        self.rounds: dict[int, _RoundState] = {}
        self.receipts: list[Receipt] = []
        self.sends: dict[tuple[int, str], int] = {}
        self.publish_errors = 0
        self.held: set[str] = set()  # devices that do not send (yet)
        self.current: int = 0
        self._lock = threading.Lock()
        self._events: queue.Queue[RoundAnnouncement] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- lifecycle
    def start(self) -> DeviceFleet:
        """Connect (the first connection listens to ``round`` and ``ack/+``)."""
        head = self.transports[0]
        head.subscribe(self.topics.round, self._on_round)
        head.subscribe(f"{self.topics.base}/ack/+", self._on_ack)
        for t in self.transports:
            t.connect(timeout=30)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop resending and disconnect."""
        self._stop.set()
        self._thread.join(30)
        for t in self.transports:
            t.close()

    # -- callbacks (transport thread: enqueue / record only)
    def _on_round(self, msg: InboundMessage) -> None:
        if msg.payload:
            self._events.put(RoundAnnouncement.from_bytes(msg.payload))

    def _on_ack(self, msg: InboundMessage) -> None:
        rec = Receipt.from_bytes(msg.payload)
        with self._lock:
            self.receipts.append(rec)
            state = self.rounds.get(rec.round_id)
            if (
                state is not None
                and rec.status in ("accepted", "duplicate")
                and state.updates.get(rec.device_id) is not None
                and state.updates[rec.device_id].update_digest == rec.update_digest
            ):
                state.done.add(rec.device_id)

    # -- worker
    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            try:
                ann = self._events.get(timeout=0.1)
            except queue.Empty:
                ann = None
            if ann is not None and ann.round_id not in self.rounds:
                self._build(ann)
                self.current = ann.round_id
                last = 0.0
            if self.current and time.monotonic() - last >= self.resend_s:
                self.send_missing(self.current)
                last = time.monotonic()

    def _build(self, ann: RoundAnnouncement) -> None:
        state = _RoundState()
        for i, ident in enumerate(self.identities):
            if self._stop.is_set():
                return
            if not self.participate(ann.round_id, ident.device_id):
                continue
            upd, vals = make_update(
                ann, self.pk, ident, delta_for(i, ann.round_id, self.dim), seed=ann.round_id
            )
            state.updates[ident.device_id] = upd
            state.values[ident.device_id] = vals
        with self._lock:
            self.rounds[ann.round_id] = state

    def send_missing(self, round_id: int) -> int:
        """Publish every update of ``round_id`` that has no receipt yet; return how many."""
        with self._lock:
            state = self.rounds.get(round_id)
            if state is None:
                return 0
            todo = [
                (d, u)
                for d, u in state.updates.items()
                if d not in state.done and d not in self.held
            ]
        sent = 0
        for device_id, upd in todo:
            t = self.transports[self.index[device_id] % len(self.transports)]
            try:
                # chunked to what this connection may send (the broker's limit)
                for topic, payload in update_messages(upd, max_message_size=t.max_message_size):
                    t.publish(topic, payload, qos=1)
            except Exception:  # not connected: the next period resends
                self.publish_errors += 1
                continue
            key = (round_id, device_id)
            self.sends[key] = self.sends.get(key, 0) + 1
            sent += 1
        return sent

    # -- queries
    def done(self, round_id: int) -> set[str]:
        """Devices holding a receipt for their update of ``round_id``."""
        with self._lock:
            state = self.rounds.get(round_id)
            return set() if state is None else set(state.done)

    def expected(self, round_id: int) -> set[str]:
        """Devices that built an update for ``round_id``."""
        with self._lock:
            state = self.rounds.get(round_id)
            return set() if state is None else set(state.updates)

    def reference_sum(self, round_id: int) -> npt.NDArray[np.int64]:
        """The exact integer sum of the devices' quantized vectors (the reference)."""
        with self._lock:
            vals = list(self.rounds[round_id].values.values())
        return np.sum(vals, axis=0)

    def digests(self, round_id: int) -> set[bytes]:
        """The update digests of ``round_id``."""
        with self._lock:
            return {u.update_digest for u in self.rounds[round_id].updates.values()}


# ------------------------------------------------------------------ observer


class Observer:
    """Records every publication on ``round`` and ``model/+`` (and reassembles models)."""

    def __init__(self, url: str, name: str = "observer") -> None:
        self.t = transport(url, name)
        self.topics = Topics(FED)
        self.announcements: list[RoundAnnouncement] = []
        self.models: list[GlobalModel] = []
        self._asm = Reassembler()
        self._lock = threading.Lock()
        self.t.subscribe(self.topics.round, self._on_round)
        self.t.subscribe(self.topics.model_filter, self._on_model)

    def start(self) -> Observer:
        """Connect."""
        self.t.connect(timeout=30)
        return self

    def close(self) -> None:
        """Disconnect."""
        self.t.close()

    def _on_round(self, msg: InboundMessage) -> None:
        if msg.payload:
            with self._lock:
                self.announcements.append(RoundAnnouncement.from_bytes(msg.payload))

    def _on_model(self, msg: InboundMessage) -> None:
        if not msg.payload:
            return
        whole = self._asm.add(Chunk.from_bytes(msg.payload))
        if whole is not None:
            with self._lock:
                self.models.append(GlobalModel.from_bytes(whole))

    def distinct_rounds(self) -> dict[int, set[bytes]]:
        """round id -> the distinct announcement encodings seen for it."""
        with self._lock:
            out: dict[int, set[bytes]] = {}
            for a in self.announcements:
                out.setdefault(a.round_id, set()).add(a.to_bytes())
            return out

    def distinct_models(self) -> dict[int, set[bytes]]:
        """model version -> the distinct digests seen for it."""
        with self._lock:
            out: dict[int, set[bytes]] = {}
            for m in self.models:
                out.setdefault(m.version, set()).add(m.digest)
            return out


# ------------------------------------------------------------------ hostile input


def _valid_chunk(device: str) -> bytes:
    return Chunk(
        federation=FED,
        stream="update",
        sender=device,
        round_id=1,
        payload_digest=bytes(32),
        payload_size=100,
        index=0,
        total=2,
        data=b"x" * 60,
    ).to_bytes()


def malformed_payloads(device: str) -> dict[str, bytes]:
    """Hostile payloads by name (each must be refused with a decode error)."""
    good = _valid_chunk(device)
    return {
        "empty": b"",
        "truncated": good[:-7],
        "trailing_bytes": good + b"\x00",
        "reserved_0xc1": b"\xc1",
        "reserved_0xc1_inside": b"\x94\x01\xa5chunk\xc1\xc4\x08" + bytes(8),
        "deep_nesting": b"\x91" * 3_000 + b"\xc0",
        "bin32_of_4GiB": b"\xc6\xff\xff\xff\xff" + b"x" * 16,
        "str32_of_4GiB": b"\xdb\xff\xff\xff\xff" + b"x" * 16,
        "array32_of_4G": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 16,
        "map32_of_4G": b"\xdf\xff\xff\xff\xff" + b"\xc0" * 16,
        "ext_type": b"\xd4\x01\x00",
        "not_msgpack": b"GET / HTTP/1.1\r\n\r\n",
        "wrong_version": b"\x94\x02\xa5chunk\x80\xc4\x08" + bytes(8),
        "unknown_kind": b"\x94\x01\xa4evil\x80\xc4\x08" + bytes(8),
        "checksum": good[:-1] + bytes([good[-1] ^ 1]),
    }
