"""MQTT broker harness: a real Mosquitto subprocess or the embedded amqtt broker.

Used by the test suite, the simulator and the demo. Both kinds bind
127.0.0.1 on a free port by default, never the well-known 1883, so several
harness brokers (and a system Mosquitto) can run side by side.

* :class:`MosquittoBroker` runs the ``mosquitto`` binary with a generated
  configuration in its own working directory (config, log, persistence). It
  speaks MQTT 5 and 3.1.1 and supports persistence, autosave interval,
  maximum packet size, maximum queued messages, a TLS listener, a password
  file and an ACL file. ``stop()`` is graceful (SIGTERM: Mosquitto writes its
  persistence file), ``kill()`` is SIGKILL (only what the last autosave wrote
  survives), ``restart()`` starts again on the same port with the same
  persistence directory.
* :class:`EmbeddedBroker` runs amqtt in a thread with its own asyncio loop.
  amqtt speaks MQTT 3.1.1 only (it refuses MQTT 5 connects), keeps nothing on
  disk, and is meant for machines without Mosquitto. It lives in the ``sim``
  extra, never on a device.

A broker that fails to start raises :class:`~edge_sdk.errors.BrokerStartError`
naming the cause and the log file; start-up never waits longer than its
timeout.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from edge_sdk.errors import BrokerError, BrokerStartError

__all__ = [
    "Broker",
    "BrokerKind",
    "EmbeddedBroker",
    "MosquittoBroker",
    "MosquittoOptions",
    "TlsListener",
    "find_mosquitto",
    "free_port",
    "mqtt_ping",
    "render_mutual_tls_config",
    "start_broker",
    "tls_listener_lines",
]

log = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "embedded"]

_MOSQUITTO_DIRS = (
    "/usr/sbin",
    "/usr/local/sbin",
    "/usr/bin",
    "/usr/local/bin",
    "/opt/homebrew/sbin",
)


def find_mosquitto() -> Path | None:
    """Return the path of the ``mosquitto`` binary, or None when absent.

    ``$EDGEFL_MOSQUITTO`` overrides the search; ``$PATH`` and the usual sbin
    folders (not always on a non-root ``$PATH``) are searched.
    """
    override = os.environ.get("EDGEFL_MOSQUITTO")
    if override:
        path = Path(override)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for folder in _MOSQUITTO_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _connect_packet(client_id: str) -> bytes:
    """Build a minimal MQTT 3.1.1 CONNECT packet (clean session, keepalive 10 s)."""
    cid = client_id.encode("ascii")
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    return bytes([0x10, len(body)]) + body


def mqtt_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """Return True when an MQTT server at host:port answers CONNECT with a CONNACK.

    Any CONNACK counts, including "not authorised": the broker is up. This
    checks the MQTT layer, not just that the port accepts TCP connections.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_connect_packet(f"edgefl-probe-{os.getpid()}-{time.monotonic_ns()}"))
            head = sock.recv(4)
            ok = len(head) >= 2 and head[0] == 0x20
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
            return ok
    except OSError:
        return False


class Broker(Protocol):
    """What every harness broker offers."""

    host: str
    port: int

    @property
    def kind(self) -> str:
        """``"mosquitto"`` or ``"embedded"``."""
        ...

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the plain listener."""
        ...

    @property
    def supports_mqtt5(self) -> bool:
        """True when the broker accepts MQTT 5 connections."""
        ...

    @property
    def running(self) -> bool:
        """True while the broker serves."""
        ...

    def start(self) -> None:
        """Start serving and wait until ready."""
        ...

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the broker answers MQTT CONNECT."""
        ...

    def stop(self) -> None:
        """Stop gracefully."""
        ...

    def kill(self) -> None:
        """Stop abruptly."""
        ...

    def restart(self, *, graceful: bool = True) -> None:
        """Stop (or kill) and start again on the same port."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsListener:
    """A TLS listener for Mosquitto.

    Attributes:
        certfile: server certificate (PEM).
        keyfile: server private key (PEM).
        cafile: CA that signs client certificates (PEM).
        port: listener port; 0 picks a free one.
        require_certificate: demand a client certificate (mutual TLS).
        use_identity_as_username: the client certificate's CN becomes the
            username the ACL sees.
        use_username_as_clientid: that username also replaces whatever
            client id the client sent, so a certificate can only ever open
            (or take over) its own session: a device presenting its own
            valid certificate with the aggregator's client id connects as
            itself and kicks nobody off. Mosquitto reads it per listener and
            only at start-up (not on SIGHUP).
        crlfile: optional certificate revocation list (PEM), re-read on
            SIGHUP (:meth:`MosquittoBroker.reload`).
    """

    certfile: Path
    keyfile: Path
    cafile: Path
    port: int = 0
    require_certificate: bool = True
    use_identity_as_username: bool = True
    use_username_as_clientid: bool = True
    crlfile: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MosquittoOptions:
    """Options for a generated Mosquitto configuration.

    Attributes:
        persistence: keep retained messages and sessions in a file.
        autosave_interval: seconds between persistence snapshots (Mosquitto's
            default is 1800; after a SIGKILL only the last snapshot survives).
        max_packet_size: largest MQTT packet accepted, bytes (None: no limit).
        max_queued_messages: per-client queue of QoS 1/2 messages; Mosquitto
            silently drops beyond it (its default is 1000).
        max_inflight_messages: QoS 1/2 messages in flight per client.
        message_size_limit: largest payload accepted, bytes (None: no limit).
        password_file: Mosquitto password file; disables anonymous access.
        acl_file: Mosquitto ACL file.
        allow_anonymous: allow clients without username (ignored when a
            password file is given, unless set explicitly to True).
        tls: an additional TLS listener.
        plain_listener: serve plain MQTT on ``port`` (the readiness check and
            most tests use it).
        use_username_as_clientid: on the plain listener, replace each
            client's id by its (password-checked) user name, binding the
            session to the credentials as :class:`TlsListener` does for
            certificates. Off by default in the harness, where tests open
            several sessions per user; production brokers want it on.
        extra_lines: appended to the configuration verbatim.
    """

    persistence: bool = True
    autosave_interval: int | None = None
    max_packet_size: int | None = None
    max_queued_messages: int | None = None
    max_inflight_messages: int | None = None
    message_size_limit: int | None = None
    password_file: Path | None = None
    acl_file: Path | None = None
    allow_anonymous: bool | None = None
    tls: TlsListener | None = None
    plain_listener: bool = True
    use_username_as_clientid: bool = False
    extra_lines: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in (
            "autosave_interval",
            "max_packet_size",
            "max_queued_messages",
            "max_inflight_messages",
            "message_size_limit",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        if self.max_packet_size is not None and self.max_packet_size < 20:
            raise ValueError(f"max_packet_size must be >= 20 bytes, got {self.max_packet_size}")
        if not self.plain_listener and self.tls is None:
            raise ValueError("a broker needs at least one listener: plain_listener or tls")


def _flag(value: bool) -> str:
    return "true" if value else "false"


def tls_listener_lines(tls: TlsListener) -> list[str]:
    """Return the Mosquitto lines configuring one TLS listener (after its ``listener`` line).

    With the defaults this is the identity binding the threat model relies
    on: a client certificate is required, its CN is the user name the ACL
    sees, and that user name is the client id, so one party's certificate
    can never open or take over another party's session.
    """
    lines = [
        f"cafile {Path(tls.cafile).resolve()}",
        f"certfile {Path(tls.certfile).resolve()}",
        f"keyfile {Path(tls.keyfile).resolve()}",
        f"require_certificate {_flag(tls.require_certificate)}",
        f"use_identity_as_username {_flag(tls.use_identity_as_username)}",
        f"use_username_as_clientid {_flag(tls.use_username_as_clientid)}",
    ]
    if tls.crlfile is not None:
        lines.append(f"crlfile {Path(tls.crlfile).resolve()}")
    return lines


def render_mutual_tls_config(
    *,
    tls: TlsListener,
    acl_file: Path,
    port: int = 8883,
    bind: str | None = None,
    persistence_location: Path | None = Path("/var/lib/mosquitto"),
    max_queued_messages: int = 100_000,
    max_packet_size: int = 1_048_576,
) -> str:
    """Return a production ``mosquitto.conf`` for a mutual-TLS-only broker.

    One listener (``tls``; its ``port`` field is ignored for ``port``), no
    anonymous access, the ACL, and the identity binding of
    :func:`tls_listener_lines`. Queue and packet limits follow
    docs/operations.md ("Mosquitto").

    Args:
        tls: certificate, key, CA and CRL files, and the binding flags.
        acl_file: the ACL (user names = certificate CNs).
        port: the listener port.
        bind: bind address; all interfaces when None.
        persistence_location: persistence folder; None disables persistence.
        max_queued_messages: per-client queue (the aggregator's offline queue).
        max_packet_size: largest MQTT packet accepted, bytes.

    Raises:
        ValueError: a port outside 1..65535 or non-positive limits.
    """
    if not 0 < port < 65_536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if max_queued_messages < 1 or max_packet_size < 20:
        raise ValueError("max_queued_messages must be >= 1 and max_packet_size >= 20")
    lines = [
        "# edgefl: mutual-TLS broker, generated by `edgefl pki mosquitto`.",
        "# Identity binding: certificate CN = ACL user = MQTT client id.",
        "# Reload (SIGHUP) after rewriting the CRL or the ACL; restart after editing",
        "# the listener options below (Mosquitto reads them at start-up only).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {Path(acl_file).resolve()}",
    ]
    if persistence_location is not None:
        lines += [
            "persistence true",
            f"persistence_location {Path(persistence_location)}/",
            "autosave_interval 30",
        ]
    else:
        lines.append("persistence false")
    lines += [
        f"max_queued_messages {max_queued_messages}",
        "max_queued_bytes 0",
        # >= the aggregator's commit_batch: it acknowledges a batch's messages
        # only once the batch is durable (docs/scale.md, group commit)
        "max_inflight_messages 100",
        f"max_packet_size {max_packet_size}",
        "persistent_client_expiration 7d",
        "",
        f"listener {port}" + (f" {bind}" if bind else ""),
        *tls_listener_lines(tls),
    ]
    return "\n".join(lines) + "\n"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _BrokerBase(abc.ABC):
    host: str
    port: int

    def __enter__(self) -> _BrokerBase:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @abc.abstractmethod
    def start(self) -> None:
        """Start serving and wait until ready."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop gracefully."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop abruptly."""

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the plain listener."""
        return f"mqtt://{self.host}:{self.port}"

    def restart(self, *, graceful: bool = True) -> None:
        """Stop (SIGTERM) or kill (SIGKILL), then start again on the same port.

        Args:
            graceful: stop cleanly (Mosquitto saves its persistence file);
                False kills the broker first.
        """
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start()


class MosquittoBroker(_BrokerBase):
    """A Mosquitto subprocess with a generated configuration.

    Args:
        workdir: folder for config, log and persistence; a temporary folder
            (removed by :meth:`cleanup`) when None.
        port: plain listener port; 0 picks a free one (kept across restarts).
        options: configuration options.
        executable: the mosquitto binary; found with :func:`find_mosquitto`
            when None.
        host: bind address (127.0.0.1 by default; never all interfaces
            unless asked).
        start_timeout: seconds :meth:`start` waits for readiness.
    """

    kind = "mosquitto"
    supports_mqtt5 = True

    def __init__(
        self,
        *,
        workdir: str | Path | None = None,
        port: int = 0,
        options: MosquittoOptions | None = None,
        executable: str | Path | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 10.0,
    ) -> None:
        exe = Path(executable) if executable is not None else find_mosquitto()
        if exe is None:
            raise BrokerStartError(
                "mosquitto is not installed (looked on $PATH and in /usr/sbin); "
                "install it (apt-get install mosquitto) or use the embedded broker",
                reason="mosquitto_missing",
            )
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise BrokerStartError(
                f"mosquitto executable {exe} does not exist or is not executable",
                reason="mosquitto_missing",
            )
        self.executable = exe
        self.options = options or MosquittoOptions()
        self.host = host
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgefl-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(host)
        self.tls_port = 0
        if self.options.tls is not None:
            self.tls_port = self.options.tls.port or free_port(host)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.persistence_dir = self.workdir / "persistence"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        """True while the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def tls_url(self) -> str | None:
        """``mqtts://host:tls_port`` when a TLS listener is configured."""
        return f"mqtts://{self.host}:{self.tls_port}" if self.tls_port else None

    def config_text(self) -> str:
        """Return the Mosquitto configuration this broker runs with."""
        opts = self.options
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            "# generated by edgefl's broker harness",
            f"user {user}",
            "per_listener_settings false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if opts.persistence:
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/"]
            if opts.autosave_interval is not None:
                lines.append(f"autosave_interval {opts.autosave_interval}")
        else:
            lines.append("persistence false")
        for name in (
            "max_packet_size",
            "max_queued_messages",
            "max_inflight_messages",
            "message_size_limit",
        ):
            value = getattr(opts, name)
            if value is not None:
                lines.append(f"{name} {value}")
        anonymous = opts.allow_anonymous
        if anonymous is None:
            anonymous = opts.password_file is None and not (
                opts.tls is not None and opts.tls.use_identity_as_username
            )
        lines.append(f"allow_anonymous {'true' if anonymous else 'false'}")
        if opts.password_file is not None:
            lines.append(f"password_file {Path(opts.password_file).resolve()}")
        if opts.acl_file is not None:
            lines.append(f"acl_file {Path(opts.acl_file).resolve()}")
        if opts.plain_listener:
            lines.append(f"listener {self.port} {self.host}")
            if opts.use_username_as_clientid:
                lines.append("use_username_as_clientid true")
        if opts.tls is not None:
            lines.append(f"listener {self.tls_port} {self.host}")
            lines += tls_listener_lines(opts.tls)
        lines += list(opts.extra_lines)
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Write the configuration, start Mosquitto and wait until it answers.

        Raises:
            BrokerStartError: Mosquitto exited, or did not answer within
                ``start_timeout`` seconds; the message quotes its log.
        """
        if self.running:
            return
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        with self.log_path.open("ab") as log_file:
            log_file.write(f"--- edgefl harness start {self.starts + 1} ---\n".encode())
            log_file.flush()
            try:
                self._proc = subprocess.Popen(
                    [str(self.executable), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BrokerStartError(
                    f"cannot run {self.executable}: {exc}; log {self.log_path}"
                ) from exc
        self.starts += 1
        try:
            self.wait_ready(self.start_timeout)
        except BrokerStartError:
            self.kill()
            raise

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until Mosquitto answers an MQTT CONNECT on its listener.

        Raises:
            BrokerStartError: the process exited or the timeout passed.
        """
        deadline = time.monotonic() + timeout
        probe_port = self.port if self.options.plain_listener else self.tls_port
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise BrokerStartError(self._failure_message(f"mosquitto exited with code {code}"))
            if self.options.plain_listener:
                if mqtt_ping(self.host, probe_port, timeout=0.5):
                    return
            elif _tcp_open(self.host, probe_port):
                return
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    self._failure_message(f"mosquitto did not answer within {timeout:.1f} s")
                )
            time.sleep(0.02)

    def _failure_message(self, what: str) -> str:
        tail = _tail(self.log_path)
        cause = ""
        lowered = tail.lower()
        if "address already in use" in lowered:
            cause = f" (cause: port {self.port} is already in use)"
        elif "error" in lowered:
            errors = [ln for ln in tail.splitlines() if "rror" in ln]
            cause = f" (cause: {errors[-1].strip()})" if errors else ""
        return f"{what}{cause}; config {self.config_path}, log {self.log_path}" + (
            f":\n{tail}" if tail else ""
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM); Mosquitto writes its persistence file.

        Falls back to SIGKILL when the broker does not exit within ``timeout``.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto ignored SIGTERM for %.1f s; killing it", timeout)
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Kill the broker with SIGKILL (no persistence write)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def reload(self) -> None:
        """Ask Mosquitto to reload its configuration (SIGHUP): password and ACL files.

        Rewrites the configuration first, so changed options take effect
        where Mosquitto supports reloading them.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise BrokerError("cannot reload: mosquitto is not running")
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)

    def cleanup(self) -> None:
        """Stop the broker and remove its temporary working directory."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        """Return the broker's log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"MosquittoBroker(url={self.url!r}, running={self.running})"


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker(_BrokerBase):
    """The amqtt broker in a background thread with its own event loop.

    MQTT 3.1.1 only, anonymous, nothing kept on disk: retained messages do
    not survive a restart. ``kill()`` drops every connection without the
    broker's shutdown sequence (no DISCONNECT, no will suppression), which is
    as close to SIGKILL as an in-process broker gets.

    Args:
        port: listener port; 0 picks a free one (kept across restarts).
        host: bind address (127.0.0.1 by default: amqtt's own default is all
            interfaces on 1883).
        start_timeout: seconds :meth:`start` waits for readiness.
    """

    kind = "embedded"
    supports_mqtt5 = False

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1", start_timeout: float = 10.0):
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self.log_path: Path | None = None

    @property
    def running(self) -> bool:
        """True while the broker thread serves."""
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def start(self) -> None:
        """Start amqtt in its thread and wait until it answers MQTT CONNECT.

        Raises:
            BrokerStartError: amqtt is not installed, failed to bind, or did
                not answer in time.
        """
        if self.running:
            return
        try:
            from amqtt.broker import Broker as AmqttBroker
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BrokerStartError(
                "the embedded broker needs amqtt: pip install 'edgefl[sim]'",
                reason="amqtt_missing",
            ) from exc
        self._ready.clear()
        self._error = None
        loop = asyncio.new_event_loop()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._broker = AmqttBroker(self._config(), loop=loop)
                await self._broker.start()

            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # reported to the starting thread
                self._error = exc
                self._ready.set()
                loop.close()
                return
            self._ready.set()
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    pending = asyncio.all_tasks(loop)
                    for task in pending:
                        task.cancel()
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=serve, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise BrokerStartError(f"embedded broker did not start within {self.start_timeout} s")
        error = self._boot_error()
        if error is not None:
            self._thread.join(5)
            self._thread = None
            cause = str(error.__cause__ or error)
            if "address already in use" in cause.lower() or "errno 98" in cause.lower():
                cause = f"port {self.port} is already in use"
            raise BrokerStartError(f"embedded broker failed to start: {cause}") from error
        self.wait_ready(self.start_timeout)

    def _boot_error(self) -> BaseException | None:
        return self._error

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the embedded broker answers MQTT CONNECT.

        Raises:
            BrokerStartError: the timeout passed.
        """
        deadline = time.monotonic() + timeout
        while not mqtt_ping(self.host, self.port, timeout=0.5):
            if time.monotonic() > deadline:
                raise BrokerStartError(f"embedded broker did not answer within {timeout:.1f} s")
            time.sleep(0.02)

    def _run(self, coro_factory: Any, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(coro_factory(), loop)
        try:
            future.result(timeout)
        except Exception as exc:  # a broken shutdown must not hang the caller
            log.warning("embedded broker: %s", exc)

    def _halt_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None
        self._loop = None
        self._broker = None
        self._ready.clear()

    def stop(self) -> None:
        """Shut amqtt down (clients get their sockets closed) and join its thread."""
        if self._thread is None:
            return
        broker = self._broker
        if broker is not None:

            async def shutdown() -> None:
                await broker.shutdown()

            self._run(shutdown)
        self._halt_thread()

    def kill(self) -> None:
        """Drop every listener and connection abruptly, then end the thread."""
        if self._thread is None:
            return
        broker = self._broker
        if broker is not None:

            async def abort() -> None:
                for server in list(getattr(broker, "_servers", {}).values()):
                    instance = getattr(server, "instance", None)
                    if instance is not None:
                        instance.close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            self._run(abort)
        self._halt_thread()

    def __repr__(self) -> str:
        return f"EmbeddedBroker(url={self.url!r}, running={self.running})"


def start_broker(
    kind: BrokerKind = "auto",
    *,
    port: int = 0,
    workdir: str | Path | None = None,
    options: MosquittoOptions | None = None,
) -> MosquittoBroker | EmbeddedBroker:
    """Start a harness broker and return it once ready.

    Args:
        kind: ``"mosquitto"``, ``"embedded"``, or ``"auto"`` (Mosquitto when
            installed, else embedded).
        port: listener port; 0 picks a free one.
        workdir: Mosquitto's working directory (temporary when None).
        options: Mosquitto options (refused for the embedded broker, which
            supports none of them).

    Returns:
        The running broker; stop it with ``stop()`` or use it as a context
        manager.

    Raises:
        BrokerStartError: the broker could not start.
        ValueError: options given for the embedded broker.
    """
    if kind == "auto":
        kind = "mosquitto" if find_mosquitto() is not None else "embedded"
    broker: MosquittoBroker | EmbeddedBroker
    if kind == "mosquitto":
        broker = MosquittoBroker(workdir=workdir, port=port, options=options)
    elif kind == "embedded":
        if options is not None:
            raise ValueError("the embedded broker takes no Mosquitto options")
        broker = EmbeddedBroker(port=port)
    else:
        raise ValueError(f"kind must be 'auto', 'mosquitto' or 'embedded', got {kind!r}")
    broker.start()
    return broker
