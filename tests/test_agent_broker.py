"""The device agent against real brokers: Mosquitto (MQTT 5) and embedded (3.1.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.agent import DeviceAgent, DeviceConfig, ModelTrainer, transport_config
from edge_sdk.crypto import PaillierPrivateKey, PaillierPublicKey, generate_keypair, save_public_key
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.models import SoftmaxRegression
from edge_sdk.privacy import PrivacyLedger
from edge_sdk.transport import MqttTransport, TransportConfig
from firmware_sim.broker import MosquittoBroker
from tests.agent_peer import ScriptedAggregator, wait_for

pytestmark = pytest.mark.broker

FED = "fed"
FEATURES, CLASSES = 4, 3
DIM = FEATURES * CLASSES + CLASSES


@pytest.fixture(scope="module")
def keypair() -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    return generate_keypair(2048)


def _aggregator(
    url: str, protocol: int, pk: PaillierPublicKey, registry: DeviceRegistry
) -> tuple[MqttTransport, ScriptedAggregator]:
    t = MqttTransport(
        TransportConfig(
            url=url,
            client_id="aggregator",
            protocol=protocol,
            reconnect_min_s=0.2,
            reconnect_max_s=1.0,
        )
    )
    agg = ScriptedAggregator(t, federation=FED, public_key=pk, registry=registry)
    t.connect(timeout=10)
    return t, agg


def _device_config(
    tmp: Path, device_id: str, url: str, protocol: int, pk: PaillierPublicKey
) -> DeviceConfig:
    save_public_key(pk, tmp / "paillier.pub", overwrite=True)
    return DeviceConfig(
        device_id=device_id,
        federation=FED,
        state_dir=tmp / device_id,
        broker={
            "url": url,
            "protocol": protocol,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
            "keepalive": 5,
        },
        public_key=tmp / "paillier.pub",
        budget_epsilon=16.0,
        delta=1e-5,
        resend_initial_s=0.5,
        resend_max_s=2.0,
    )


def _trainer(seed: int) -> ModelTrainer:
    rng = np.random.default_rng(seed)
    return ModelTrainer(
        SoftmaxRegression(FEATURES, CLASSES),
        rng.normal(size=(30, FEATURES)).astype(np.float32),
        rng.integers(0, CLASSES, size=30),
    )


def test_device_completes_rounds_on_each_broker(
    broker: MosquittoBroker, tmp_path: Path, keypair: tuple[PaillierPublicKey, PaillierPrivateKey]
) -> None:
    protocol = 5 if broker.supports_mqtt5 else 311
    pk = keypair[0]
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    agg_t, agg = _aggregator(broker.url, protocol, pk, registry)
    cfg = _device_config(tmp_path, "pi-1", broker.url, protocol, pk)
    agent = DeviceAgent(cfg, _trainer(1), MqttTransport(transport_config(cfg)), public_key=pk)
    registry.enroll("pi-1", agent.identity.public_key_bytes)
    agent.start(connect_timeout=10)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        for round_id in (1, 2):
            agg.announce(round_id, dimension=DIM)
            wait_for(
                lambda r=round_id: any(u.round_id == r for u in agg.updates),
                what=f"round {round_id} update",
            )
            wait_for(lambda: agent.session.outbox is None, what="receipt")
            agg.publish_model(round_id, np.full(DIM, 0.01 * round_id, dtype=np.float32))
            wait_for(lambda r=round_id: agent.session.model_version == r, what="new model")
        assert agg.rejected == []
        assert [e.round_id for e in agent.ledger.entries] == [1, 2]
    finally:
        agent.stop()
        agg_t.close()


def test_update_arrives_after_broker_kill_and_restart(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey],
) -> None:
    pk = keypair[0]
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    agg_t, agg = _aggregator(mosquitto.url, 5, pk, registry)
    agg.auto_receipt = False
    cfg = _device_config(tmp_path, "pi-2", mosquitto.url, 5, pk)
    agent = DeviceAgent(cfg, _trainer(2), MqttTransport(transport_config(cfg)), public_key=pk)
    registry.enroll("pi-2", agent.identity.public_key_bytes)
    agent.start(connect_timeout=10)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(1, dimension=DIM)
        wait_for(lambda: len(agg.updates) >= 1, what="first delivery")
        first = agg.raw_update_payloads[0]
        mosquitto.kill()
        mosquitto.start()
        before = len(agg.updates)
        wait_for(lambda: len(agg.updates) > before, timeout=30, what="resend after restart")
        assert agg.raw_update_payloads[-1] == first
        agg.auto_receipt = True
        agg.receipt(agg.updates[-1], "accepted")
        wait_for(lambda: agent.session.outbox is None, what="receipt after restart")
        assert len(agent.ledger.entries) == 1
    finally:
        agent.stop()
        agg_t.close()


def _write_device_files(tmp: Path, url: str, pk: PaillierPublicKey) -> Path:
    save_public_key(pk, tmp / "paillier.pub", overwrite=True)
    rng = np.random.default_rng(7)
    np.savez(
        tmp / "data.npz",
        x=rng.normal(size=(30, FEATURES)).astype(np.float32),
        y=rng.integers(0, CLASSES, size=30),
    )
    config = tmp / "device.toml"
    config.write_text(f"""
[device]
id = "pi-9"
federation = "{FED}"
state_dir = "{tmp / "state"}"
resend_initial_s = 0.5
resend_max_s = 2.0

[broker]
url = "{url}"
keepalive = 5

[keys]
public_key = "{tmp / "paillier.pub"}"

[privacy]
budget_epsilon = 16.0
delta = 1e-5

[training]
model = "softmax"
features = {FEATURES}
classes = {CLASSES}
data = "{tmp / "data.npz"}"
""")
    return config


def _spawn(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_sdk.cli", "device", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_device_process_killed_mid_upload_resends_the_same_envelope(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey],
) -> None:
    pk = keypair[0]
    config = _write_device_files(tmp_path, mosquitto.url, pk)
    DeviceIdentity.generate("pi-9").save(tmp_path / "state" / "device.key")
    registry = DeviceRegistry(tmp_path / "registry.json", FED)
    registry.enroll("pi-9", DeviceIdentity.load(tmp_path / "state" / "device.key").public_key_bytes)
    agg_t, agg = _aggregator(mosquitto.url, 5, pk, registry)
    agg.auto_receipt = False
    proc = _spawn(config)
    try:
        agg.publish_model(0, np.zeros(DIM, dtype=np.float32))
        agg.announce(1, dimension=DIM)
        wait_for(lambda: len(agg.updates) >= 1, timeout=60, what="upload from the process")
        first = agg.raw_update_payloads[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        ledger_after_kill = PrivacyLedger.open_existing(tmp_path / "state" / "ledger.json")
        assert len(ledger_after_kill.entries) == 1
        proc = _spawn(config)
        before = len(agg.updates)
        wait_for(lambda: len(agg.updates) > before, timeout=60, what="resend after restart")
        assert agg.raw_update_payloads[-1] == first, "the envelope must not be re-noised"
        agg.receipt(agg.updates[-1], "accepted")
        outbox = tmp_path / "state" / "outbox"
        wait_for(lambda: not any(outbox.glob("*.update")), what="outbox cleared")
        ledger = PrivacyLedger.open_existing(tmp_path / "state" / "ledger.json")
        assert len(ledger.entries) == 1
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_sdk.cli",
                "device",
                "status",
                "--config",
                str(config),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(status.stdout)["rounds"] == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        agg_t.close()
