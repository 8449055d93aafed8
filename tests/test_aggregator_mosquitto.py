"""Integration on Mosquitto: 20 scripted devices, the aggregator as a real subprocess,
SIGKILL at every state transition (EDGEFL_CRASH_AT), restart, bit-exact aggregates."""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.keyholder_config import run_ceremony
from aggregator.rounds import round_outcome
from aggregator.store import AggregatorStore
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey, load_public_key
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.protocol import (
    EncryptedUpdate,
    Receipt,
    RoundAnnouncement,
    Topics,
)
from firmware_sim.broker import MosquittoBroker
from tests import test_aggregator_support as _support
from tests.mqtt_client import TestClient
from tests.reliability_helpers import spawn_aggregator
from tests.test_aggregator_support import SAFE_PRIMES, make_update, update_messages

keypair = _support.keypair  # session fixture

FED = "itest"
N_DEVICES = 20
DIM = 50
ROUNDS = 2
REPO = Path(__file__).resolve().parent.parent
T = Topics(FED)


def _delta(device_index: int, round_id: int) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(1000 * round_id + device_index)
    return rng.normal(0.0, 0.05, DIM)


class ScriptedFleet:
    """20 devices behind one MQTT connection: build once per round, resend until receipted."""

    def __init__(
        self, broker: MosquittoBroker, pk: PaillierPublicKey, idents: list[DeviceIdentity]
    ) -> None:
        self.pk = pk
        self.idents = idents
        self.client = TestClient(broker.host, broker.port, client_id="fleet")
        self.updates: dict[int, dict[str, EncryptedUpdate]] = {}
        self.values: dict[int, dict[str, npt.NDArray[np.int64]]] = {}
        self.done: dict[int, set[str]] = {}
        self.statuses: list[tuple[int, str, str]] = []
        self.round: RoundAnnouncement | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.client.connect()
        self.client.subscribe(T.round)
        self.client.subscribe(f"{T.base}/ack/+")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def _run(self) -> None:
        last_send = 0.0
        while not self._stop.is_set():
            try:
                msg = self.client.expect(timeout=0.2)
            except Exception:
                msg = None
            if msg is not None:
                if msg.topic == T.round:
                    ann = RoundAnnouncement.from_bytes(msg.payload)
                    if ann.round_id not in self.updates:
                        self._build(ann)
                    self.round = ann
                    last_send = 0.0
                else:
                    rec = Receipt.from_bytes(msg.payload)
                    with self._lock:
                        self.statuses.append((rec.round_id, rec.device_id, rec.status))
                        if rec.status in ("accepted", "duplicate"):
                            self.done.setdefault(rec.round_id, set()).add(rec.device_id)
            if self.round is not None and time.monotonic() - last_send > 2.0:
                self._send_missing(self.round.round_id)
                last_send = time.monotonic()

    def _build(self, ann: RoundAnnouncement) -> None:
        ups, vals = {}, {}
        for i, ident in enumerate(self.idents):
            upd, v = make_update(ann, self.pk, ident, _delta(i, ann.round_id), seed=ann.round_id)
            ups[ident.device_id], vals[ident.device_id] = upd, v
        self.updates[ann.round_id], self.values[ann.round_id] = ups, vals

    def _send_missing(self, round_id: int) -> None:
        with self._lock:
            done = set(self.done.get(round_id, set()))
        for device_id, upd in self.updates[round_id].items():
            if device_id in done:
                continue
            for topic, payload in update_messages(upd):
                self.client.publish(topic, payload, wait=False)


def _setup(
    tmp: Path, keys: tuple[PaillierPublicKey, PaillierPrivateKey], broker: MosquittoBroker
) -> tuple[Path, list[DeviceIdentity]]:
    pk, _ = keys
    run_ceremony(  # the committee's members run in the aggregator's process here
        tmp / "keys",
        federation=FED,
        holders=3,
        threshold=2,
        passphrase=b"pw",
        min_clients=10,
        primes=SAFE_PRIMES,
    )
    assert load_public_key(tmp / "keys" / "paillier_public.json") == pk
    registry = DeviceRegistry(tmp / "registry.json", FED)
    idents = [DeviceIdentity.generate(f"d{i:02d}") for i in range(N_DEVICES)]
    for ident in idents:
        registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
    registry.save()
    cfg = tmp / "aggregator.toml"
    cfg.write_text(
        f"""
[aggregator]
federation = "{FED}"
store = "agg.db"
public_key = "keys/paillier_public.json"
registry = "registry.json"
dimension = {DIM}
min_clients = 10
target_clients = {N_DEVICES}
max_contributors = 64
round_duration_s = 120
rounds = {ROUNDS}
clip = 1.0
tick_s = 0.1

[aggregator.optimizer]
name = "fedavgm"
lr = 1.0
momentum = 0.5

[committee]
manifest = "keys/committee.json"
mode = "inprocess-insecure-dev"
members = ["keys/keyholder-1", "keys/keyholder-2", "keys/keyholder-3"]

[broker]
url = "{broker.url}"
client_id = "agg-itest"
""",
        encoding="utf-8",
    )
    return cfg, idents


def _aggregator(cfg: Path, crash: str | None) -> subprocess.Popen[bytes]:
    return spawn_aggregator(cfg, crash, extra_env={"EDGEFL_KEY_PASSPHRASE": "pw"})


def _expected_weights(fleet: ScriptedFleet, scale: float) -> npt.NDArray[np.float32]:
    w = np.zeros(DIM, dtype=np.float32)
    v: npt.NDArray[np.float64] | None = None
    for r in range(1, ROUNDS + 1):
        total = np.sum(list(fleet.values[r].values()), axis=0)
        delta = total.astype(np.float64) / (scale * N_DEVICES)
        v = delta if v is None else 0.5 * v + delta
        w = (w.astype(np.float64) + v).astype(np.float32)
    return w


CRASH_POINTS = [
    None,
    "init_before_commit:1",
    "after_start:1",
    "accept_before_commit:5",
    "accept_after_commit:7",
    "close_before_commit:1",
    "close_after_commit:1",
    "after_decrypt:1",
    "result_before_commit:1",
    "result_after_commit:1",
    "accept_after_commit:33",
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill9_at_each_transition_gives_bit_exact_result(
    crash: str | None, keypair: Any, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    cfg, idents = _setup(tmp_path, keypair, mosquitto)
    fleet = ScriptedFleet(mosquitto, keypair[0], idents)
    fleet.start()
    try:
        proc = _aggregator(cfg, crash)
        out, _ = proc.communicate(timeout=120)
        if crash is not None:
            assert proc.returncode == -9, out.decode(errors="replace")[-2000:]
            proc = _aggregator(cfg, None)
            out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    finally:
        fleet.stop()
    store = AggregatorStore(tmp_path / "agg.db", readonly=True)
    try:
        for r in range(1, ROUNDS + 1):
            rec = store.round_record(r)
            assert rec is not None and rec.phase == "done", rec
            rows = store.accepted(r)
            assert sorted(d for d, _, _ in rows) == sorted(i.device_id for i in idents)
            assert {dig for _, dig, _ in rows} == {
                u.update_digest for u in fleet.updates[r].values()
            }
            results, released = round_outcome(rec.result)
            result = results[0]
            assert result.count == N_DEVICES
            expected = np.sum(list(fleet.values[r].values()), axis=0)
            np.testing.assert_array_equal(released, expected)
        latest = store.latest_model()
        assert latest is not None and latest[0].version == ROUNDS
        ann = RoundAnnouncement.from_bytes(store.round_record(1).announcement)  # type: ignore[union-attr]
        from edge_sdk.crypto import PackingSpec

        scale = PackingSpec.from_bytes(ann.packing).scale
        np.testing.assert_array_equal(
            np.frombuffer(latest[0].weights, "<f4"), _expected_weights(fleet, scale)
        )
        # the chain: every version's parent is the previous digest
        models = store.models()
        for (_, _, parent), (v, _, _) in itertools.pairwise(models):
            assert store.model(v).parent_digest == parent  # type: ignore[union-attr]
    finally:
        store.close()
