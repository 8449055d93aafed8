"""The harness's own RabbitMQ node with the MQTT plugin.

The machine's RabbitMQ (node ``rabbit@localhost``, AMQP on 5672, distribution
on 25672) is never touched: this node has its own node name, its own HOME
(so its own Erlang cookie), its own ``epmd`` on a free port
(``ERL_EPMD_PORT``), its own distribution port, data and log folders, an
enabled-plugins file naming only ``rabbitmq_mqtt``, an empty environment file
instead of ``/etc/rabbitmq/rabbitmq-env.conf``, and a ``rabbitmq.conf`` that
puts the MQTT listener on a free 127.0.0.1 port (never 1883) and switches
AMQP's listener off. The whole node runs in its own process group, which
:meth:`RabbitMQBroker.stop` ends.

Start-up takes 10-30 s on a shared 2-core machine (Erlang boot plus about 5 s
in which the MQTT plugin waits for cluster peers before electing itself the
leader of its client-id registry), so the test suite starts one node per
session.

Settings chosen for edgefl (docs/transport.md, "RabbitMQ"):

* ``mqtt.prefetch`` (RabbitMQ default 10): unacknowledged QoS 1 deliveries
  per MQTT session. An aggregator that acknowledges after its store commit
  would receive only 10 updates at a time; the harness uses 1000.
* RabbitMQ 3.10 speaks MQTT 3.1.1 only (MQTT 5 came with 3.13), delivers
  retained messages only to subscriptions whose filter is exactly the topic
  (not to ``model/+``), and has no MQTT packet-size setting.
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
from firmware_sim.broker import _tcp_open, free_port, mqtt_ping

__all__ = ["RabbitMQBroker", "RabbitMQOptions", "find_epmd", "find_rabbitmq_server"]

log = logging.getLogger(__name__)

_RABBIT_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server")


def find_rabbitmq_server() -> Path | None:
    """Return the ``rabbitmq-server`` start script, or None when absent.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the
    ``rabbitmq`` user and writes into /var/log/rabbitmq; the script it wraps
    (``/usr/lib/rabbitmq/bin/rabbitmq-server``) is preferred.
    ``$EDGEFL_RABBITMQ_SERVER`` overrides the search.
    """
    override = os.environ.get("EDGEFL_RABBITMQ_SERVER")
    candidates = [override] if override else list(_RABBIT_CANDIDATES)
    for name in candidates:
        path = Path(name)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def find_epmd() -> Path | None:
    """Return Erlang's ``epmd`` binary, or None."""
    found = shutil.which("epmd")
    if found:
        return Path(found)
    for candidate in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class RabbitMQOptions:
    """What the node's ``rabbitmq.conf`` sets.

    Attributes:
        prefetch: ``mqtt.prefetch``, unacknowledged deliveries per session.
        username: a user created at first start (``default_user``); with it
            anonymous MQTT connections are refused.
        password: that user's password.
    """

    prefetch: int = 1000
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")


class RabbitMQBroker:
    """A RabbitMQ node of the harness's own, serving MQTT 3.1.1 on a free port.

    Args:
        workdir: configs, data, logs and HOME; a temporary folder (removed by
            :meth:`cleanup`) when None.
        options: MQTT settings.
        host: bind address.
        start_timeout: seconds :meth:`start` waits for the MQTT listener.

    Raises:
        BrokerStartError: RabbitMQ or epmd is not installed.
    """

    kind = "rabbitmq"
    supports_mqtt5 = False

    def __init__(
        self,
        *,
        workdir: str | Path | None = None,
        options: RabbitMQOptions | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 120.0,
    ) -> None:
        """Reserve ports and folders (:meth:`start` runs the node)."""
        script = find_rabbitmq_server()
        epmd = find_epmd()
        if script is None or epmd is None:
            raise BrokerStartError(
                "rabbitmq-server is not installed (apt-get install rabbitmq-server)",
                reason="rabbitmq_missing",
            )
        self.script = script
        self.epmd = epmd
        self.options = options or RabbitMQOptions()
        self.host = host
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgefl-rabbitmq-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(host)
        """The MQTT listener port."""
        self.dist_port = free_port(host)
        self.epmd_port = free_port(host)
        self.nodename = f"edgefl-{os.getpid()}-{self.port}@localhost"
        self.config_path = self.workdir / "rabbitmq.conf"
        self.plugins_path = self.workdir / "enabled_plugins"
        self.env_path = self.workdir / "rabbitmq-env.conf"
        self.log_dir = self.workdir / "log"
        self.data_dir = self.workdir / "mnesia"
        self.home = self.workdir / "home"
        self.startup_log = self.workdir / "startup.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd_proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        """How long the latest :meth:`start` took until MQTT answered."""

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the MQTT listener."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the node's start script (and so the node) runs."""
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        """Return the node's ``rabbitmq.conf``."""
        opts = self.options
        lines = [
            "# generated by edgefl's broker harness",
            "listeners.tcp = none",
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}",
            f"mqtt.prefetch = {opts.prefetch}",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "loopback_users = none",
            "disk_free_limit.absolute = 50MB",
            "log.console = false",
            "log.file.level = info",
        ]
        if opts.username is not None:
            lines += [
                f"default_user = {opts.username}",
                f"default_pass = {opts.password}",
                "mqtt.allow_anonymous = false",
            ]
        else:
            lines.append("mqtt.allow_anonymous = true")
        return "\n".join(lines) + "\n"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.home),
                "RABBITMQ_CONF_ENV_FILE": str(self.env_path),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": self.host,
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": self.host,
                "RABBITMQ_MNESIA_BASE": str(self.data_dir),
                "RABBITMQ_LOG_BASE": str(self.log_dir),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_path),
                "RABBITMQ_CONFIG_FILE": str(self.config_path),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.workdir / "plugins-expand"),
                "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _start_epmd(self) -> None:
        # Our own epmd, in our process group: the node never registers with
        # (or starts a daemon beside) the machine's epmd on 4369.
        with (self.workdir / "epmd.log").open("ab") as out:
            self._epmd_proc = subprocess.Popen(
                [str(self.epmd), "-port", str(self.epmd_port), "-address", self.host],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not _tcp_open(self.host, self.epmd_port):
            if self._epmd_proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerStartError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.05)

    def start(self) -> None:
        """Write the files, start epmd and the node, wait until MQTT answers.

        Raises:
            BrokerStartError: the node exited or did not answer within
                ``start_timeout``; the message quotes its log.
        """
        if self.running:
            return
        for folder in (self.log_dir, self.data_dir, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        self.plugins_path.write_text("[rabbitmq_mqtt].\n", encoding="utf-8")
        self.env_path.write_text("# edgefl harness: no settings from /etc/rabbitmq\n")
        started = time.monotonic()
        self._start_epmd()
        with self.startup_log.open("ab") as out:
            try:
                self._proc = subprocess.Popen(
                    [str(self.script)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=self._env(),
                    start_new_session=True,
                )
            except OSError as exc:
                self._stop_epmd()
                raise BrokerStartError(f"cannot run {self.script}: {exc}") from exc
        try:
            self.wait_ready(self.start_timeout)
        except BrokerStartError:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - started

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the MQTT listener answers CONNECT.

        Raises:
            BrokerStartError: the node exited or the timeout passed.
        """
        deadline = time.monotonic() + timeout
        while not mqtt_ping(self.host, self.port, timeout=1.0):
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise BrokerStartError(self._failure(f"rabbitmq-server exited with code {code}"))
            if time.monotonic() > deadline:
                raise BrokerStartError(self._failure(f"no MQTT answer within {timeout:.0f} s"))
            time.sleep(0.2)

    def _failure(self, what: str) -> str:
        tail = ""
        with contextlib.suppress(OSError):
            text = self.startup_log.read_text(encoding="utf-8", errors="replace")
            tail = "\n".join(text.splitlines()[-15:])
        return f"{what}; config {self.config_path}, logs {self.log_dir}, {self.startup_log}" + (
            f":\n{tail}" if tail else ""
        )

    def _signal_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the group this harness created (start_new_session)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node (SIGTERM to its own process group, SIGKILL after ``timeout``)."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("rabbitmq ignored SIGTERM for %.0f s; killing it", timeout)
            self._signal_group(proc, signal.SIGKILL)  # leftovers (beam children)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self._proc = None
        self._stop_epmd()

    def kill(self) -> None:
        """SIGKILL the node's process group."""
        proc = self._proc
        if proc is not None:
            self._signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self._proc = None
        self._stop_epmd()

    def _stop_epmd(self) -> None:
        proc = self._epmd_proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._epmd_proc = None

    def cleanup(self) -> None:
        """Stop the node and remove a temporary working folder."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RabbitMQBroker:
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
        return f"RabbitMQBroker(url={self.url!r}, node={self.nodename!r}, running={self.running})"
