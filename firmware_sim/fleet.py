"""A simulated fleet over a real MQTT broker: the whole stack in one process.

Each device is a real :class:`~edge_sdk.agent.DeviceAgent` with its own
identity, privacy ledger, outbox folder (its "flash"), data partition and
MQTT connection. The aggregator is the real :class:`AggregatorService` with
its SQLite store; the key holders are a real T-of-N committee
(``edgefl keys ceremony``), each member its own ``edgefl keyholder serve``
process on the broker, verifying every sum on its own. Nothing is mocked:
updates are trained, clipped, noised, packed, Paillier-encrypted, signed,
chunked, published, verified, summed blind, decrypted by ``T`` members'
shares and applied by the server optimizer.

Device faults (:class:`DeviceProfile`): a CPU slowdown factor (a Pi is
several times slower than this machine), availability (a device sits a round
out), reboots in the middle of a round (after the update is stored, before
its receipt: the rebooted agent must resend the same envelope), and link
latency through the fault proxy.

Brokers: a harness broker (``auto``, ``mosquitto``, ``embedded``,
``rabbitmq``, ``nats`` for a 3-node cluster) or the url of a running one,
or several comma-separated urls of one cluster's nodes. With several urls the
parties are spread over the nodes (aggregator on the first, key holder ``k``
on node ``k + 1``, device ``j`` on node ``j + 2``, modulo the node count) and
each lists the other nodes as failover urls. The MQTT version, credentials
(the password is passed to :class:`Fleet`, never kept in the config or the
summary), TLS files and a told broker packet limit reach every party.

Threads: every device has two (paho's network loop and its agent worker),
so this mode suits tens of devices; thousands run in
:mod:`firmware_sim.engine`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.committee import CommitteeManifest, CommitteeVerifier
from aggregator.config import relay_folder
from aggregator.keyholder_config import PolicyTerms, run_ceremony
from aggregator.optimizers import FedAvg, make_optimizer
from aggregator.planning import EvaluationPlan
from aggregator.rounds import RoundConfig, RoundMachine, round_metrics
from aggregator.service import AggregatorService
from aggregator.shards import RootMachine, WorkerMachine
from aggregator.store import AggregatorStore
from edge_sdk.agent import (
    AgentHalt,
    AgentHooks,
    DeviceAgent,
    DeviceConfig,
    ModelTrainer,
    transport_config,
)
from edge_sdk.crypto import load_public_key
from edge_sdk.errors import EdgeFLError
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.models import TrainConfig
from edge_sdk.policy import FederationPolicy
from edge_sdk.privacy import compose_epsilon, round_cost
from edge_sdk.transport import MqttTransport, TransportConfig
from firmware_sim.broker import BrokerKind, EmbeddedBroker, MosquittoBroker, start_broker
from firmware_sim.broker_nats import NatsCluster
from firmware_sim.broker_rabbitmq import RabbitMQBroker
from firmware_sim.committee import CommitteeProcesses
from firmware_sim.datasets import load_dataset
from firmware_sim.engine import SimConfig, build_model, fleet_plan
from firmware_sim.faults import FaultProxy
from firmware_sim.partition import partition

__all__ = [
    "HARNESS_BROKERS",
    "DeviceProfile",
    "Fleet",
    "FleetConfig",
    "FleetResult",
    "FleetRound",
    "node_urls",
]

HARNESS_BROKERS = ("auto", "mosquitto", "embedded", "rabbitmq", "nats")
"""Broker kinds the fleet starts itself (anything else must be urls)."""


def node_urls(broker: str) -> list[str]:
    """The urls of a ``--broker`` value naming running brokers (comma-separated).

    Raises:
        ValueError: a value that is neither a harness kind nor urls.
    """
    urls = [u.strip() for u in broker.split(",") if u.strip()]
    if not urls or any("://" not in u for u in urls):
        raise ValueError(
            f"broker must be one of {', '.join(HARNESS_BROKERS)} or mqtt[s]:// urls, got {broker!r}"
        )
    return urls


log = logging.getLogger(__name__)


class SimulatedReboot(AgentHalt):
    """Raised inside a device agent to simulate a power loss mid-round."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """How a simulated device misbehaves.

    Attributes:
        slowdown: training takes this many times longer (1 = this machine).
        availability: probability that the device takes part in a round.
        reboot_prob: probability of a reboot after the update is stored and
            before its receipt (the rebooted agent resends it).
        link_latency_ms: one-way latency added by the fault proxy.
    """

    slowdown: float = 1.0
    availability: float = 1.0
    reboot_prob: float = 0.0
    link_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1, got {self.slowdown}")
        if not 0 < self.availability <= 1 or not 0 <= self.reboot_prob < 1:
            raise ValueError("availability must be in (0, 1] and reboot_prob in [0, 1)")
        if self.link_latency_ms < 0:
            raise ValueError(f"link_latency_ms must be >= 0, got {self.link_latency_ms}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetConfig:
    """A full-stack simulation over a broker."""

    federation: str = "demo"
    devices: int = 20
    rounds: int = 10
    dataset: str = "digits"
    model: str = "onnx-mlp"
    hidden: int = 16
    partition: str = "dirichlet"
    alpha: float = 0.5
    privacy: str = "dp"
    epsilon: float = 8.0
    delta: float = 1e-5
    clip: float = 1.0
    min_clients: int | None = None
    round_duration_s: float = 60.0
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.1
    prox_mu: float = 0.0
    server_opt: str = "fedavg"
    server_lr: float = 1.0
    key_bits: int = 2048
    holders: int = 3
    threshold: int = 2
    broker: str = "auto"
    mqtt: int | None = None
    username: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    broker_max_packet_size: int | None = None
    profile: DeviceProfile = field(default_factory=DeviceProfile)
    seed: int = 0
    #: federated evaluation every this many rounds (0: off); each device
    #: evaluates the received model on its share of the validation split
    evaluate_every: int = 0
    #: more than 1: the aggregator is a root and this many workers, each taking
    #: one shard of the devices on its own broker connection (docs/scale.md)
    workers: int = 1

    def __post_init__(self) -> None:
        if self.privacy not in ("dp", "he"):
            raise ValueError(f"privacy must be dp or he, got {self.privacy!r}")
        if not 1 <= self.workers <= 16:
            raise ValueError(f"workers must be in 1..16, got {self.workers}")
        if self.devices < 1 or self.rounds < 1:
            raise ValueError("devices and rounds must be >= 1")
        if not 1 <= self.threshold <= self.holders:
            raise ValueError(
                f"need 1 <= threshold <= holders, got {self.threshold} of {self.holders}"
            )
        if self.mqtt not in (None, 5, 311):
            raise ValueError(f"mqtt must be 5 or 311 (3.1.1), got {self.mqtt!r}")
        if self.broker not in HARNESS_BROKERS:
            urls = node_urls(self.broker)
            if self.profile.link_latency_ms > 0 and len(urls) > 1:
                raise ValueError("link latency goes through one fault proxy: give one broker url")
        elif self.tls_ca or self.tls_cert or self.username:
            raise ValueError("credentials and TLS options need a broker url (mqtts:// for TLS)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        TrainConfig(lr=self.lr, prox_mu=self.prox_mu)  # as [aggregator.train] is checked

    @property
    def quorum(self) -> int:
        """The round quorum (default: 80% of the devices expected online)."""
        if self.min_clients is not None:
            return self.min_clients
        expected = self.devices * self.profile.availability
        return max(1, int(0.8 * expected))


@dataclass(frozen=True, slots=True)
class FleetRound:
    """One finished round as the fleet saw it."""

    round: int
    contributors: int
    expected: int
    accuracy: float
    loss: float
    epsilon: float
    bytes_up: int
    seconds: float
    fed_accuracy: float | None = None
    fed_loss: float | None = None


@dataclass(slots=True)
class FleetResult:
    """The run: per-round figures and the broker used."""

    config: dict[str, Any]
    broker: str
    rounds: list[FleetRound] = field(default_factory=list)
    bytes_per_param: float = 0.0
    dimension: int = 0
    seconds: float = 0.0
    reboots: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    keyholder_refusals: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        last = self.rounds[-1] if self.rounds else None
        return {
            "config": self.config,
            "broker": self.broker,
            "rounds": len(self.rounds),
            "final_accuracy": last.accuracy if last else None,
            "epsilon": last.epsilon if last else 0.0,
            "delta": self.config.get("delta"),
            "bytes_per_param": self.bytes_per_param,
            "dimension": self.dimension,
            "devices": self.config.get("devices"),
            "keyholders": {"n": self.config.get("holders"), "t": self.config.get("threshold")},
            "keyholder_refusals": self.keyholder_refusals,
            "seconds": round(self.seconds, 2),
            "reboots": self.reboots,
            "rejections": self.rejections,
            "per_round": [asdict(r) for r in self.rounds],
        }


ProgressFn = Callable[[str, dict[str, Any]], None]


class Fleet:
    """Sets up broker, keys, key holder, aggregator and devices; runs rounds.

    Args:
        config: the simulation.
        workdir: folder for keys, the aggregator store and every device's state.
        progress: called with ``("round", figures)`` after each round and
            ``("update", {"round", "received", "expected"})`` as updates arrive.
        password: the broker password of ``config.username`` (kept out of
            the config and the summary).
        primes: known safe primes (tests): skips prime generation.
    """

    def __init__(
        self,
        config: FleetConfig,
        workdir: str | Path,
        *,
        progress: ProgressFn | None = None,
        password: str | None = None,
        primes: tuple[int, int] | None = None,
    ) -> None:
        if password is not None and config.username is None:
            raise ValueError("a password needs config.username")
        self._password = password
        self._urls: list[str] = []
        self.config = config
        self._primes = primes  # known safe primes (tests): skips prime generation
        self.committee: CommitteeProcesses | None = None
        self.workdir = Path(workdir)
        self.progress = progress or (lambda kind, data: None)
        self._rng = random.Random(config.seed)
        self.agents: dict[str, DeviceAgent] = {}
        self._offline: set[str] = set()
        self._workers: list[AggregatorService] = []
        self._reboot_requests: list[str] = []
        self._lock = threading.Lock()
        self.reboots = 0

    # ------------------------------------------------------------- devices
    def _hooks(self, device_id: str) -> AgentHooks:
        profile = self.config.profile

        def after_step(step: str, round_id: int) -> None:
            if step == "outbox" and profile.reboot_prob > 0:
                with self._lock:
                    hit = self._rng.random() < profile.reboot_prob
                if hit:
                    with self._lock:
                        self._reboot_requests.append(device_id)
                    raise SimulatedReboot(f"{device_id} lost power in round {round_id}")

        return AgentHooks(after_step=after_step, slowdown=profile.slowdown)

    def _start_agent(self, device_id: str) -> None:
        spec = self._device_specs[device_id]
        model = build_model(self._sim_config, self._data)
        trainer = ModelTrainer(model, spec["x"], spec["y"], eval_data=spec.get("eval"))
        cfg: DeviceConfig = spec["config"]
        transport = MqttTransport(transport_config(cfg))
        agent = DeviceAgent(
            cfg,
            trainer,
            transport,
            public_key=self._public_key,
            hooks=self._hooks(device_id),
            require_privacy=self.config.privacy == "dp",
        )
        agent.start(connect_timeout=30)
        self.agents[device_id] = agent

    def _stop_agent(self, device_id: str) -> None:
        agent = self.agents.pop(device_id, None)
        if agent is not None:
            agent.stop(timeout=5)

    # ------------------------------------------------------------------ run
    def run(self, *, timeout_s: float | None = None) -> FleetResult:
        """Run the configured rounds; returns when done or on timeout.

        Raises:
            EdgeFLError: the fleet could not be set up, or no round completed
                before the timeout.
        """
        cfg = self.config
        started = time.perf_counter()
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        broker: MosquittoBroker | EmbeddedBroker | RabbitMQBroker | NatsCluster | None = None
        proxy: FaultProxy | None = None
        service: AggregatorService | None = None
        try:
            if cfg.broker not in HARNESS_BROKERS:
                urls, supports5, broker_name = node_urls(cfg.broker), True, cfg.broker
            else:
                broker = self._start_harness_broker(cfg.broker)
                urls = list(broker.urls) if isinstance(broker, NatsCluster) else [broker.url]
                supports5, broker_name = broker.supports_mqtt5, broker.kind
            protocol = cfg.mqtt or (5 if supports5 else 311)
            self._urls = urls
            device_urls = urls
            if cfg.profile.link_latency_ms > 0:
                host_port = urls[0].split("://", 1)[1]
                host, port = host_port.rsplit(":", 1)
                proxy = FaultProxy(host, int(port)).start()
                proxy.latency(cfg.profile.link_latency_ms / 1000)
                device_urls = [proxy.url]
            result = FleetResult(config=asdict(cfg), broker=broker_name)
            service = self._setup(device_urls, protocol)
            self._loop(service, result, timeout_s)
        finally:
            for device_id in list(self.agents):
                self._stop_agent(device_id)
            if service is not None:
                result.rejections = dict(service.machine.rejections)
                for worker in self._workers:
                    for reason, n in worker.machine.rejections.items():
                        result.rejections[reason] = result.rejections.get(reason, 0) + n
                result.keyholder_refusals = int(service.machine.stats["keyholder_refused"])
                service.close()
            for worker in self._workers:
                worker.close()
            if self.committee is not None:
                self.committee.stop()
            if proxy is not None:
                proxy.stop()
            if broker is not None:
                broker.stop()
                if isinstance(broker, (RabbitMQBroker, NatsCluster)):
                    broker.cleanup()
        result.seconds = time.perf_counter() - started
        result.reboots = self.reboots
        return result

    def _start_harness_broker(
        self, kind: str
    ) -> MosquittoBroker | EmbeddedBroker | RabbitMQBroker | NatsCluster:
        if kind == "rabbitmq":
            self.progress("setup", {"step": "starting a RabbitMQ node (MQTT plugin)"})
            rabbit = RabbitMQBroker(workdir=self.workdir / "rabbitmq")
            rabbit.start()
            return rabbit
        if kind == "nats":
            self.progress("setup", {"step": "starting a 3-node NATS cluster"})
            cluster = NatsCluster(workdir=self.workdir / "nats")
            cluster.start()
            return cluster
        if kind == "embedded":
            return start_broker("embedded")
        harness: BrokerKind = kind  # type: ignore[assignment]
        return start_broker(harness, workdir=self.workdir / "broker")

    def transport_settings(self, urls: list[str], node: int, protocol: int) -> dict[str, Any]:
        """What every party's transport gets: its node, failover nodes, access settings.

        Args:
            urls: the broker's node urls.
            node: the party's position; it connects to ``urls[node % len(urls)]``.
            protocol: 5 or 311.
        """
        cfg = self.config
        first = node % len(urls)
        ordered = urls[first:] + urls[:first]
        settings: dict[str, Any] = {"url": ordered[0], "protocol": protocol}
        if len(ordered) > 1:
            settings["failover_urls"] = ordered[1:]
        optional = {
            "username": cfg.username,
            "password": self._password,
            "ca_file": cfg.tls_ca,
            "cert_file": cfg.tls_cert,
            "key_file": cfg.tls_key,
            "broker_max_packet_size": cfg.broker_max_packet_size,
        }
        settings.update({k: v for k, v in optional.items() if v is not None})
        return settings

    def _configure_members(self, keys: Path, protocol: int) -> None:
        """Point every committee member's ``[broker]`` at its node, with the access settings."""
        for k, config in enumerate(sorted(keys.glob("*/keyholder.toml"))):
            settings = {
                **self.transport_settings(self._urls, k + 1, protocol),
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 2.0,
            }
            lines = []
            for line in config.read_text(encoding="utf-8").splitlines():
                key = line.split("=", 1)[0].strip()
                if key not in settings:
                    lines.append(line)
            # [broker] is the file's last table: the keys below land in it
            lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
            config.write_text("\n".join(lines) + "\n", encoding="utf-8")
            config.chmod(0o600)  # it may hold the broker password

    def _setup(self, device_urls: list[str], protocol: int) -> AggregatorService:
        cfg = self.config
        url = self._urls[0]
        self.progress(
            "setup",
            {
                "step": f"key ceremony: {cfg.key_bits}-bit key as {cfg.threshold}-of-"
                f"{cfg.holders} shares"
            },
        )
        keys = self.workdir / "keys"
        quorum = min(cfg.quorum, cfg.devices)
        summary = run_ceremony(
            keys,
            federation=cfg.federation,
            holders=cfg.holders,
            threshold=cfg.threshold,
            bits=cfg.key_bits,
            passphrase=None,
            insecure_unencrypted=True,  # a simulation's shares live in a temp folder
            min_clients=quorum,
            registry="../../registry.json",
            broker_url=url,
            protocol=protocol,
            allow_insecure_size=cfg.key_bits < 2048,
            primes=self._primes,
            terms=PolicyTerms(
                mode="distributed" if cfg.privacy == "dp" else "none",
                min_clients=quorum,
                epsilon=cfg.epsilon,
                delta=cfg.delta,
                rounds=cfg.rounds,
                max_clip=cfg.clip,
            ),
        )
        policy = FederationPolicy.load(keys / "policy.json")
        holder_ids = [
            DeviceIdentity.load(folder / "identity.key")
            for folder in sorted(keys.glob("keyholder-*"))
        ]
        self.ceremony_s = float(summary["ceremony_s"])
        pk = load_public_key(keys / "paillier_public.json", min_bits=min(2048, cfg.key_bits))
        manifest = CommitteeManifest.load(keys / "committee.json", min_bits=min(2048, cfg.key_bits))
        self._public_key = pk
        self._data = load_dataset(cfg.dataset, seed=cfg.seed)
        self._sim_config = SimConfig(
            dataset=cfg.dataset, model=cfg.model, hidden=cfg.hidden, seed=cfg.seed
        )
        shards = partition(
            self._data.y_train, cfg.devices, scheme=cfg.partition, alpha=cfg.alpha, seed=cfg.seed
        )
        registry = DeviceRegistry(self.workdir / "registry.json", cfg.federation)
        self._device_specs: dict[str, dict[str, Any]] = {}
        held_out = np.array_split(
            np.random.default_rng(cfg.seed + 7).permutation(len(self._data.y_val)), cfg.devices
        )
        for i, idx in enumerate(shards):
            device_id = f"dev-{i:03d}"
            state = self.workdir / "devices" / device_id
            identity = DeviceIdentity.generate(device_id)
            identity.save(state / "device.key")
            registry.enroll(device_id, identity.public_key_bytes)
            for holder in holder_ids:  # the committee approves the enrollment
                registry.approve(device_id, holder)
            dcfg = DeviceConfig(
                device_id=device_id,
                federation=cfg.federation,
                state_dir=state,
                broker={
                    **self.transport_settings(device_urls, i + 2, protocol),
                    "keepalive": 10,
                    "reconnect_min_s": 0.2,
                    "reconnect_max_s": 2.0,
                },
                public_key=keys / "paillier_public.json",
                policy=keys / "policy.json",
                policy_digest=policy.digest,
                budget_epsilon=cfg.epsilon * 1.0001,
                delta=cfg.delta,
                resend_initial_s=5.0,
                resend_max_s=20.0,
                pool_target=0,  # 20+ simulated devices share 2 cores: no idle time to fill
            )
            self._device_specs[device_id] = {
                "x": self._data.x_train[idx],
                "y": self._data.y_train[idx],
                "config": dcfg,
            }
            if cfg.evaluate_every:  # the device's local held-out data
                share = held_out[len(self._device_specs) - 1]
                if share.size:
                    self._device_specs[device_id]["eval"] = (
                        self._data.x_val[share],
                        self._data.y_val[share],
                    )
        registry.save()
        registry.require_approvals(
            {h.holder_id: h.public_key for h in manifest.holders}, manifest.threshold
        )
        self.progress("setup", {"step": f"starting {cfg.holders} key holders (one process each)"})
        self._configure_members(keys, protocol)
        self.committee = CommitteeProcesses.from_ceremony(keys)
        self.committee.start()
        model = build_model(self._sim_config, self._data)
        weights = model.get_flat().astype(np.float32)
        self._eval_model = model
        plan = fleet_plan(
            pk,
            dimension=int(weights.size),
            # a worker holds at most max_contributors // workers: room for any split
            devices=cfg.devices * cfg.workers,
            min_clients=quorum,
            clip=cfg.clip,
            dp=cfg.privacy == "dp",
            epsilon=cfg.epsilon,
            delta=cfg.delta,
            rounds=cfg.rounds,
            evaluation=EvaluationPlan(every=cfg.evaluate_every) if cfg.evaluate_every else None,
        )
        self._plan = plan
        aggregator_identity = DeviceIdentity.generate("aggregator")
        for spec in self._device_specs.values():  # devices pin the aggregator's key
            spec["config"] = dataclasses.replace(
                spec["config"], aggregator_key=aggregator_identity.public_key_bytes
            )
        round_config = RoundConfig(
            # re-ask members every 5 s (the service default is 30 s): a member
            # that lost updates to a broker failover asks for their relay on a re-ask
            keyholder_retry_ms=5_000,
            federation=cfg.federation,
            min_clients=quorum,
            target_clients=cfg.devices,
            round_duration_ms=int(cfg.round_duration_s * 1000),
            rounds=cfg.rounds,
            train=(
                ("batch_size", cfg.batch_size),
                ("epochs", cfg.local_epochs),
                ("lr", cfg.lr),
                *((("prox_mu", cfg.prox_mu),) if cfg.prox_mu > 0 else ()),
            ),
        )
        common: dict[str, Any] = {
            "initial_weights": weights,
            "committee": CommitteeVerifier(manifest),
            "identity": aggregator_identity,
            "binding": policy.djn_base,
        }
        optimizer = make_optimizer({"name": cfg.server_opt, "lr": cfg.server_lr})
        machine: RoundMachine
        if cfg.workers > 1:
            machine = RootMachine(
                round_config, plan, registry, optimizer, shards=cfg.workers, **common
            )
        else:
            machine = RoundMachine(round_config, plan, registry, optimizer, **common)

        def service_for(m: RoundMachine, name: str, node: int) -> AggregatorService:
            db = self.workdir / f"{name}.db"
            store = AggregatorStore(db, federation=cfg.federation, key_fingerprint=pk.fingerprint)
            transport = MqttTransport(
                TransportConfig(
                    **self.transport_settings(self._urls, node, protocol),
                    client_id=f"edgefl-{name}-{cfg.federation}",
                    clean_start=False,
                    session_expiry_s=3600,
                    manual_ack=True,
                    reconnect_min_s=0.2,
                    reconnect_max_s=2.0,
                )
            )
            return AggregatorService(m, store, transport, relay_dir=relay_folder(db))

        service = service_for(machine, "aggregator", 0)
        # workers on the nodes after the root's (the members' nodes too)
        self._workers = [
            service_for(
                WorkerMachine(
                    round_config, plan, registry, FedAvg(), shard=k, shards=cfg.workers, **common
                ),
                f"aggregator.worker-{k}",
                k + 1,
            )
            for k in range(cfg.workers if cfg.workers > 1 else 0)
        ]
        self.progress("setup", {"step": f"starting {cfg.devices} devices"})
        self._schedule_availability()  # round 1's drop-outs never come online
        for device_id in self._device_specs:
            if device_id not in self._offline:
                self._start_agent(device_id)
        for worker in self._workers:
            worker.start(connect_timeout=30)
        service.start(connect_timeout=30)
        return service

    def _loop(
        self, service: AggregatorService, result: FleetResult, timeout_s: float | None
    ) -> None:
        cfg = self.config
        machine = service.machine
        deadline = time.monotonic() + (timeout_s or cfg.rounds * (cfg.round_duration_s + 30))
        seen_version = 0
        current_round = 1  # round 1's availability was drawn at set-up
        last_model_at = time.perf_counter()
        last_count = -1
        expected = cfg.devices - len(self._offline)
        while not machine.finished and time.monotonic() < deadline:
            service.pump(timeout=0.05 if not self._workers else 0.0)
            for worker in self._workers:  # one thread: each store stays on it
                worker.pump(timeout=0.0)
            if self._workers:
                time.sleep(0.01)
            self._handle_reboots()
            model = machine.model
            if model is not None and model.version > seen_version:
                # before the next round's drop-outs change ``expected``
                seen_version = model.version
                result.rounds.append(self._evaluate(model, service, last_model_at, expected))
                last_model_at = time.perf_counter()
                self.progress("round", asdict(result.rounds[-1]))
            if machine.round_id != current_round:
                current_round = machine.round_id
                expected = self._schedule_availability()
                last_count = -1
            if machine.count != last_count and machine.phase == "collecting":
                last_count = machine.count
                self.progress(
                    "update", {"round": current_round, "received": last_count, "expected": expected}
                )
        if not result.rounds:
            tails = ""
            if self.committee is not None:  # what the members said, for the post-mortem
                tails = "".join(
                    f"\n--- {m.name}:\n" + "".join(m.lines[-12:]) for m in self.committee.members
                )
            raise EdgeFLError(f"no round completed before the timeout{tails}")
        result.dimension = self._plan.dimension
        per_update = self._plan.num_ciphertexts * self._public_key.ciphertext_bytes
        result.bytes_per_param = per_update / self._plan.dimension

    def _evaluate(
        self, model: Any, service: AggregatorService, started: float, expected: int
    ) -> FleetRound:
        weights = np.frombuffer(model.weights, dtype="<f4")
        self._eval_model.set_flat(weights)
        metrics = self._eval_model.evaluate(self._data.x_test, self._data.y_test)
        record = service.store.round_record(model.round_id)
        count = record.count if record is not None else 0
        eps = 0.0
        noise = self._plan.noise
        if noise is not None:
            # what each device's ledger charged: the model releases of every
            # round and the evaluation releases of the evaluation rounds
            costs = [
                (round_cost(noise, self._plan.packing_for(r).extras), 1)
                for r in range(1, model.version + 1)
            ]
            eps = compose_epsilon(costs, noise.delta)
        fed = None if record is None else round_metrics(record)
        return FleetRound(
            round=model.version,
            contributors=count,
            expected=expected,
            accuracy=float(metrics.get("accuracy", float("nan"))),
            loss=float(metrics["loss"]),
            epsilon=eps,
            bytes_up=count * self._plan.num_ciphertexts * self._public_key.ciphertext_bytes,
            seconds=time.perf_counter() - started,
            fed_accuracy=None if fed is None else fed.accuracy,
            fed_loss=None if fed is None else fed.loss,
        )

    def _schedule_availability(self) -> int:
        """Take some devices offline for this round (drop-outs); bring back the rest."""
        availability = self.config.profile.availability
        for device_id in sorted(self._device_specs):
            with self._lock:
                offline = availability < 1.0 and self._rng.random() >= availability
            if offline:
                self._stop_agent(device_id)
                self._offline.add(device_id)
            elif not offline and device_id in self._offline:
                self._offline.discard(device_id)
                self._start_agent(device_id)
        return len(self._device_specs) - len(self._offline)

    def _handle_reboots(self) -> None:
        with self._lock:
            pending, self._reboot_requests = self._reboot_requests, []
        for device_id in pending:
            agent = self.agents.get(device_id)
            if agent is None:
                continue
            deadline = time.monotonic() + 5
            while agent.error is None and time.monotonic() < deadline:
                time.sleep(0.01)
            self._stop_agent(device_id)
            self.reboots += 1
            self._start_agent(device_id)
