"""A 3-node NATS cluster with MQTT and JetStream, started by the harness.

Each node is its own ``nats-server`` process with its own server name, store
folder, client port, cluster (route) port and MQTT port, all on 127.0.0.1
free ports: the machine's own NATS (4222) is never touched. NATS implements
MQTT 3.1.1 (not 5) on top of JetStream: sessions, QoS 1 messages and
retained messages live in JetStream streams, replicated over the cluster
(``stream_replicas``), so a client that loses its node reconnects to
another one and resumes its session there.

Settings chosen for edgefl (docs/transport.md, "NATS"):

* ``mqtt.ack_wait`` (NATS default 30 s): how long NATS waits for the PUBACK
  of a QoS 1 message it delivered before sending it again, even on a live
  connection. The aggregator acknowledges only after its store is durable;
  the harness uses 5 s so a message lost with a killed node's connection is
  redelivered within seconds, not half a minute.
* ``mqtt.max_ack_pending`` (NATS default 1024): unacknowledged messages per
  subscription; beyond it NATS stops delivering to that subscriber.
* ``mqtt.stream_replicas`` / ``consumer_replicas``: 3 on a 3-node cluster,
  so the session, message and retained streams survive the loss of a node.
* ``max_payload``: the NATS limit for NATS messages; 2.9.10 does not apply
  it to MQTT PUBLISH packets (measured), so clients must be told their
  limit (``TransportConfig.broker_max_packet_size``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edge_sdk.errors import BrokerStartError
from firmware_sim.broker import free_port, mqtt_ping

__all__ = ["NatsCluster", "NatsNode", "NatsOptions", "find_nats_server"]

log = logging.getLogger(__name__)

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


def find_nats_server() -> Path | None:
    """Return the ``nats-server`` binary, or None (``$EDGEFL_NATS_SERVER`` overrides)."""
    override = os.environ.get("EDGEFL_NATS_SERVER")
    if override:
        path = Path(override)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    for folder in _SEARCH:
        candidate = Path(folder) / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsOptions:
    """MQTT and JetStream settings of every node.

    Attributes:
        ack_wait_s: seconds before an unacknowledged QoS 1 delivery is resent.
        max_ack_pending: unacknowledged deliveries per subscription.
        replicas: JetStream replicas of the MQTT streams and consumers
            (at most the number of nodes).
        max_payload: NATS ``max_payload`` in bytes.
        max_file_store: JetStream file storage per node, bytes.
        max_memory_store: JetStream memory storage per node, bytes.
    """

    ack_wait_s: float = 5.0
    max_ack_pending: int = 1024
    replicas: int = 3
    max_payload: int = 1_048_576
    max_file_store: int = 1 << 30
    max_memory_store: int = 64 << 20

    def __post_init__(self) -> None:
        if self.ack_wait_s <= 0 or self.max_ack_pending < 1 or self.replicas < 1:
            raise ValueError("ack_wait_s, max_ack_pending and replicas must be positive")


class NatsNode:
    """One ``nats-server`` process of a :class:`NatsCluster`."""

    def __init__(self, *, name: str, workdir: Path, executable: Path, host: str) -> None:
        """Reserve ports and folders (:meth:`start` runs the process)."""
        self.name = name
        self.workdir = workdir
        self.executable = executable
        self.host = host
        self.client_port = free_port(host)
        self.cluster_port = free_port(host)
        self.port = free_port(host)
        """The MQTT listener port."""
        self.config_path = workdir / f"{name}.conf"
        self.log_path = workdir / f"{name}.log"
        self.store_dir = workdir / f"{name}-store"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of this node's MQTT listener."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self._proc is not None and self.running else None

    def config_text(self, options: NatsOptions, cluster_ports: list[int]) -> str:
        """Return this node's configuration."""
        routes = ", ".join(f"nats-route://{self.host}:{p}" for p in cluster_ports)
        return "\n".join(
            [
                "# generated by edgefl's broker harness",
                f"server_name: {self.name}",
                f"listen: {self.host}:{self.client_port}",
                f"max_payload: {options.max_payload}",
                "jetstream {",
                f'  store_dir: "{self.store_dir}"',
                f"  max_memory_store: {options.max_memory_store}",
                f"  max_file_store: {options.max_file_store}",
                "}",
                "cluster {",
                "  name: edgefl",
                f"  listen: {self.host}:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
                "mqtt {",
                f"  listen: {self.host}:{self.port}",
                f'  ack_wait: "{options.ack_wait_s:g}s"',
                f"  max_ack_pending: {options.max_ack_pending}",
                f"  stream_replicas: {options.replicas}",
                f"  consumer_replicas: {options.replicas}",
                "}",
                "",
            ]
        )

    def start(self, options: NatsOptions, cluster_ports: list[int]) -> None:
        """Write the configuration and start the process (no readiness wait)."""
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(options, cluster_ports), encoding="utf-8")
        with self.log_path.open("ab") as log_file:
            try:
                self._proc = subprocess.Popen(
                    [str(self.executable), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BrokerStartError(f"cannot run {self.executable}: {exc}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (falls back to SIGKILL after ``timeout``)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the node vanishes without telling its peers or clients."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def exited_code(self) -> int | None:
        """The exit code when the process has died, else None."""
        proc = self._proc
        return None if proc is None else proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the node's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class NatsCluster:
    """Three (or ``size``) clustered ``nats-server`` nodes with MQTT and JetStream.

    Args:
        workdir: configs, logs and JetStream stores; a temporary folder
            (removed by :meth:`cleanup`) when None.
        size: number of nodes (3 for a cluster that survives one loss).
        options: MQTT and JetStream settings.
        executable: the binary; found with :func:`find_nats_server` when None.
        host: bind address of every listener.
        start_timeout: seconds :meth:`start` waits for every node's MQTT.

    Raises:
        BrokerStartError: ``nats-server`` is not installed.
    """

    kind = "nats"
    supports_mqtt5 = False

    def __init__(
        self,
        *,
        workdir: str | Path | None = None,
        size: int = 3,
        options: NatsOptions | None = None,
        executable: str | Path | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 60.0,
    ) -> None:
        """Reserve ports and folders for every node."""
        exe = Path(executable) if executable is not None else find_nats_server()
        if exe is None:
            raise BrokerStartError(
                "nats-server is not installed (apt-get install nats-server)",
                reason="nats_missing",
            )
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.options = options or NatsOptions(replicas=min(3, size))
        if self.options.replicas > size:
            raise ValueError(f"replicas ({self.options.replicas}) exceed the {size} nodes")
        self.host = host
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgefl-nats-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            NatsNode(name=f"n{i + 1}", workdir=self.workdir, executable=exe, host=host)
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's MQTT url, in node order."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """The first node's MQTT url."""
        return self.nodes[0].url

    @property
    def running(self) -> bool:
        """True while every node runs."""
        return all(n.running for n in self.nodes)

    def _cluster_ports(self) -> list[int]:
        return [n.cluster_port for n in self.nodes]

    def start(self) -> None:
        """Start every node and wait until each answers MQTT CONNECT.

        Raises:
            BrokerStartError: a node exited or did not answer in time; the
                message quotes its log.
        """
        for node in self.nodes:
            node.start(self.options, self._cluster_ports())
        try:
            self.wait_ready(self.start_timeout)
        except BrokerStartError:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 60.0, nodes: list[NatsNode] | None = None) -> None:
        """Block until the (given or every) running node answers an MQTT CONNECT.

        NATS answers a CONNECT only once JetStream holds the account's MQTT
        streams, which on a cluster needs a JetStream leader: this is the
        real readiness, not just an open port.

        Raises:
            BrokerStartError: a node exited or the timeout passed.
        """
        deadline = time.monotonic() + timeout
        pending = list(nodes if nodes is not None else self.nodes)
        while pending:
            node = pending[0]
            code = node.exited_code()
            if code is not None or not node.running:
                raise BrokerStartError(
                    f"nats node {node.name} exited with code {code}; log {node.log_path}:\n"
                    f"{node.log_tail()}"
                )
            if mqtt_ping(node.host, node.port, timeout=2.0):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"nats node {node.name} did not answer MQTT within {timeout:.0f} s; "
                    f"log {node.log_path}:\n{node.log_tail()}"
                )
            time.sleep(0.1)

    def kill_node(self, index: int) -> NatsNode:
        """SIGKILL node ``index`` (0-based); the others keep serving."""
        node = self.nodes[index]
        node.kill()
        return node

    def restart_node(self, index: int, timeout: float = 60.0) -> None:
        """Start node ``index`` again on its ports and store, and wait for it."""
        node = self.nodes[index]
        node.start(self.options, self._cluster_ports())
        self.wait_ready(timeout, nodes=[node])

    def stop(self) -> None:
        """Stop every node (SIGTERM)."""
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()

    def cleanup(self) -> None:
        """Stop every node and remove a temporary working folder."""
        self.stop()
        if self._own_workdir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.workdir)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"NatsCluster(urls={self.urls!r}, running={self.running})"
