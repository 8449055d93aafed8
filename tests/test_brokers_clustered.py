"""Full rounds over other brokers: a 3-node NATS cluster losing a node, RabbitMQ's MQTT plugin.

Everything is real: device agents (training, noise, Paillier, signatures,
outboxes), the aggregator service with its SQLite store, and a 2-of-3
key-holder committee of ``edgefl keyholder serve`` processes, all over MQTT
3.1.1 (neither broker speaks MQTT 5 here). The quorum is every device, so a
round completes only if no update is lost.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.store import AggregatorStore
from edge_sdk.cli import main
from edge_sdk.errors import ConfigError
from edge_sdk.privacy import PrivacyLedger
from edge_sdk.protocol import shard_of
from edge_sdk.transport import (
    ConnectRefusedError,
    InboundMessage,
    MqttTransport,
    TransportConfig,
)
from firmware_sim.broker_nats import NatsCluster
from firmware_sim.broker_rabbitmq import RabbitMQBroker
from firmware_sim.fleet import Fleet, FleetConfig
from tests.test_aggregator_support import SAFE_PRIMES

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _config(broker: str, **kw: Any) -> FleetConfig:
    base: dict[str, Any] = dict(
        devices=5,
        rounds=2,
        min_clients=5,
        model="softmax",
        clip=0.5,
        lr=0.3,
        local_epochs=2,
        round_duration_s=40,
        broker=broker,
        mqtt=311,
        epsilon=4.0,
    )
    base.update(kw)
    return FleetConfig(**base)


def _charged_rounds(workdir: Path) -> list[list[int]]:
    ledgers = sorted((workdir / "devices").glob("*/ledger.json"))
    return [[e.round_id for e in PrivacyLedger.open_existing(p).entries] for p in ledgers]


class _NodeKiller:
    """Kills one cluster node when the first update goes by (seen from another node).

    Also records when each round completed (``progress``), so a test can
    check that the node died while round 1 was still collecting.
    """

    def __init__(self, cluster: NatsCluster, node: int, watch_url: str, topic: str) -> None:
        self.cluster, self.node = cluster, node
        self.killed_at: list[float] = []
        self.round_done_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self.watcher = MqttTransport(
            TransportConfig(url=watch_url, client_id="watcher", protocol=311, clean_start=True)
        )
        self.watcher.subscribe(topic, self._on_update, qos=0)
        self.watcher.connect(timeout=30)

    def _on_update(self, message: InboundMessage) -> None:
        with self._lock:
            if self.killed_at:
                return
            self.killed_at.append(time.monotonic())
        threading.Thread(target=self.cluster.kill_node, args=(self.node,), daemon=True).start()

    def progress(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "round":
            self.round_done_at.setdefault(int(data["round"]), time.monotonic())

    def check_killed_mid_round_1(self) -> None:
        assert self.killed_at, "the node must die while round 1 collects"
        assert self.killed_at[0] < self.round_done_at[1], "the node died after round 1 had closed"
        assert not self.cluster.nodes[self.node].running


def test_round_over_a_nats_cluster_survives_killing_the_aggregators_node(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    urls = nats_cluster.urls
    # node 1 carries the aggregator, key holder 3 and devices 1 and 4; it dies as
    # soon as the first update is on its way (seen from node 2), while round 1
    # collects: the aggregator may not have it yet, the others are still to come
    killer = _NodeKiller(nats_cluster, 0, urls[1], "edgefl/v1/natsfed/updates/+")
    try:
        cfg = _config(",".join(urls), federation="natsfed")
        fleet = Fleet(cfg, tmp_path / "w", progress=killer.progress, primes=SAFE_PRIMES)
        placement = {
            "aggregator": fleet.transport_settings(urls, 0, 311)["url"],
            "holders": [fleet.transport_settings(urls, k + 1, 311)["url"] for k in range(3)],
            "devices": [fleet.transport_settings(urls, j + 2, 311)["url"] for j in range(5)],
        }
        assert set(placement["holders"]) == set(urls) and set(placement["devices"]) == set(urls)
        result = fleet.run(timeout_s=240)  # below the per-test timeout: its own error
    finally:
        killer.watcher.close()

    killer.check_killed_mid_round_1()
    assert [r.round for r in result.rounds] == [1, 2]
    assert [r.contributors for r in result.rounds] == [5, 5]  # nothing lost
    assert result.rejections == {}
    assert result.keyholder_refusals == 0
    assert _charged_rounds(tmp_path / "w") == [[1, 2]] * 5  # each device charged once a round


def test_a_sharded_round_over_a_nats_cluster_survives_killing_a_workers_node(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """A root and two aggregator workers, members and devices spread over three nodes."""
    urls = nats_cluster.urls
    # node 3 carries worker 1, key holder 2 and devices 0 and 3
    killer = _NodeKiller(nats_cluster, 2, urls[0], "edgefl/v1/natsshard/updates/+/+")
    try:
        cfg = _config(",".join(urls), federation="natsshard", workers=2)
        fleet = Fleet(cfg, tmp_path / "w", progress=killer.progress, primes=SAFE_PRIMES)
        at = [fleet.transport_settings(urls, k, 311)["url"] for k in range(3)]
        assert len(set(at)) == 3  # root, worker 0, worker 1: three nodes
        result = fleet.run(timeout_s=240)
    finally:
        killer.watcher.close()

    killer.check_killed_mid_round_1()
    assert [r.round for r in result.rounds] == [1, 2]
    assert [r.contributors for r in result.rounds] == [5, 5]  # nothing lost
    assert set(result.rejections) <= {"ahead", "no_round"}  # a device quicker than a worker
    assert result.keyholder_refusals == 0
    assert _charged_rounds(tmp_path / "w") == [[1, 2]] * 5
    for k in range(2):  # each worker took only its own shard, each device once
        with AggregatorStore(tmp_path / "w" / f"aggregator.worker-{k}.db", readonly=True) as st:
            for r in (1, 2):
                devices = [d for d, _, _ in st.accepted(r)]
                assert len(devices) == len(set(devices))
                assert all(shard_of(d, 2) == k for d in devices)


def test_rounds_over_the_rabbitmq_mqtt_plugin(rabbitmq: RabbitMQBroker, tmp_path: Path) -> None:
    opts = rabbitmq.options
    cfg = _config(
        rabbitmq.url, devices=4, min_clients=4, federation="rmqfed", username=opts.username
    )
    result = Fleet(cfg, tmp_path / "w", password=opts.password, primes=SAFE_PRIMES).run(
        timeout_s=180
    )
    assert [r.round for r in result.rounds] == [1, 2]
    assert [r.contributors for r in result.rounds] == [4, 4]
    assert result.rejections == {}
    assert "password" not in json.dumps(result.to_json())


def test_rabbitmq_refuses_a_wrong_password(rabbitmq: RabbitMQBroker) -> None:
    transport = MqttTransport(
        TransportConfig(
            url=rabbitmq.url,
            client_id="intruder",
            protocol=311,
            username=rabbitmq.options.username,
            password="not-the-password",
        )
    )
    try:
        with pytest.raises(ConnectRefusedError):
            transport.connect(timeout=20)
    finally:
        transport.close()


def test_sim_run_over_rabbitmq_with_mqtt_311_and_a_password_file(
    rabbitmq: RabbitMQBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert rabbitmq.options.password is not None
    secret = tmp_path / "broker-password"
    secret.write_text(rabbitmq.options.password + "\n", encoding="utf-8")
    out = tmp_path / "s.json"
    base = ["sim", "run", "--broker", rabbitmq.url, "--mqtt", "3.1.1", "--username", "edgefl"]
    code = main(
        [
            *base,
            "--password-file",
            str(secret),
            "--devices",
            "3",
            "--rounds",
            "1",
            "--model",
            "softmax",
            "--crypto",
            "on",
            "--min-clients",
            "3",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["rounds"] == 1 and summary["per_round"][0]["contributors"] == 3
    assert summary["config"]["mqtt"] == 311 and summary["config"]["username"] == "edgefl"
    assert rabbitmq.options.password not in out.read_text()
    # a user name without a password (no file, no environment) is a usage error
    monkeypatch.delenv("EDGEFL_BROKER_PASSWORD", raising=False)
    assert main([*base, "--crypto", "on"]) == 2


def test_sim_run_refuses_broker_options_without_a_broker() -> None:
    assert main(["sim", "run", "--mqtt", "3.1.1", "--devices", "2", "--rounds", "1"]) == 2


def test_fleet_config_refuses_bad_broker_settings() -> None:
    with pytest.raises(ValueError, match="mqtt must be 5 or 311"):
        FleetConfig(broker="mqtt://127.0.0.1:1", mqtt=4)
    with pytest.raises(ValueError, match="need a broker url"):
        FleetConfig(broker="mosquitto", username="u")
    with pytest.raises(ValueError, match="broker must be one of"):
        FleetConfig(broker="rabbit")
    with pytest.raises(ConfigError, match="scheme"):
        TransportConfig(
            url="mqtt://127.0.0.1:1", client_id="c", failover_urls=("mqtts://127.0.0.1:2",)
        )


def test_sim_run_passes_tls_options_to_every_party(tmp_path: Path) -> None:
    from firmware_sim.broker import MosquittoBroker, MosquittoOptions, TlsListener
    from firmware_sim.pki import CertificateAuthority
    from tests.conftest import _require_mosquitto

    _require_mosquitto()
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("broker", "broker")
    ca.issue("device", "fleet")  # one client certificate for every simulated party
    options = MosquittoOptions(
        plain_listener=False,
        tls=TlsListener(
            certfile=ca.cert_path("broker"),
            keyfile=ca.key_path("broker"),
            cafile=ca.ca_cert,
            use_identity_as_username=False,  # parties share the certificate: keep their ids
            use_username_as_clientid=False,
        ),
    )
    with MosquittoBroker(workdir=tmp_path / "m", options=options) as broker:
        assert broker.tls_url is not None
        out = tmp_path / "s.json"
        args = ["sim", "run", "--broker", broker.tls_url, "--devices", "3", "--rounds", "1"]
        args += ["--model", "softmax", "--crypto", "on", "--min-clients", "3"]
        args += ["--tls-ca", str(ca.ca_cert), "--json", str(out), "--workdir", str(tmp_path / "w")]
        assert (
            main(
                [
                    *args,
                    "--tls-cert",
                    str(ca.cert_path("fleet")),
                    "--tls-key",
                    str(ca.key_path("fleet")),
                ]
            )
            == 0
        )
        summary = json.loads(out.read_text())
        assert summary["per_round"][0]["contributors"] == 3
        assert summary["config"]["tls_ca"] == str(ca.ca_cert)
