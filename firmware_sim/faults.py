"""A TCP fault proxy for bad links between MQTT clients and a broker.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every accepted
connection to an upstream (the broker). Its mode can be switched at run time
from any thread:

* ``PASS``: forward bytes unchanged.
* ``LATENCY``: deliver every chunk ``latency_s`` later, order preserved (the
  link's throughput is kept; only its delay changes).
* ``BANDWIDTH``: cap each direction of each connection at ``bandwidth_bps``
  bytes per second.
* ``BLACKHOLE``: keep accepting and reading, forward nothing, in both
  directions, like a dead path behind a NAT. A connection that was
  blackholed stays dead after healing (its stream lost bytes), so clients
  must detect it with their keepalive and reconnect; new connections made
  after healing pass.
* ``RESET``: close every connection at once and close each new one as soon
  as it is accepted.

The proxy runs its own asyncio loop in a daemon thread, so synchronous tests
and the simulator can use it directly. No ready-made fault proxy is
installable from the package registries here, hence this small one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType

__all__ = ["FaultMode", "FaultProxy", "ProxyStats"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_BANDWIDTH_SLICE = 4096


class FaultMode(enum.Enum):
    """How the proxy treats traffic."""

    PASS = "pass"
    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass(slots=True)
class ProxyStats:
    """Counters of a proxy since it started (read them with :meth:`FaultProxy.stats`)."""

    connections_accepted: int = 0
    connections_open: int = 0
    connections_reset: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    bytes_dropped: int = 0


class _Link:
    """One proxied client connection: two pumps and their shared fate."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.dead = False  # blackholed once: never forwards again
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for _, writer in (self.client, self.upstream):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()

    async def pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer, upstream))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                mode = self.proxy.mode
                if mode is FaultMode.BLACKHOLE or self.dead:
                    self.dead = True
                    self.proxy._stats.bytes_dropped += len(data)
                    continue
                delay = self.proxy.latency_s if mode is FaultMode.LATENCY else 0.0
                queue.put_nowait((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:
        stats = self.proxy._stats
        while True:
            item = await queue.get()
            if item is None:
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.dead or self.proxy.mode is FaultMode.BLACKHOLE:
                self.dead = True
                stats.bytes_dropped += len(data)
                continue
            step = _BANDWIDTH_SLICE if self.proxy.mode is FaultMode.BANDWIDTH else len(data)
            for start in range(0, len(data), step):
                piece = data[start : start + step]
                rate = self.proxy.bandwidth_bps
                if self.proxy.mode is FaultMode.BANDWIDTH and rate > 0:
                    # pay for the bytes before they leave: a token bucket of one slice
                    await asyncio.sleep(len(piece) / rate)
                try:
                    writer.write(piece)
                    await writer.drain()
                except (ConnectionError, OSError):
                    return
                if upstream:
                    stats.bytes_upstream += len(piece)
                else:
                    stats.bytes_downstream += len(piece)


class FaultProxy:
    """A switchable TCP proxy in front of an upstream server.

    Args:
        upstream_host: host of the server to forward to.
        upstream_port: its port.
        listen_host: address the proxy listens on.
        listen_port: port to listen on; 0 picks a free one.

    Example:
        >>> proxy = FaultProxy("127.0.0.1", broker.port)  # doctest: +SKIP
        >>> proxy.start()  # clients connect to proxy.port  # doctest: +SKIP
        >>> proxy.blackhole(); ...; proxy.heal()  # doctest: +SKIP
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = listen_host
        self.port = listen_port
        self._mode = FaultMode.PASS
        self.latency_s = 0.0
        self.bandwidth_bps = 0.0
        self._stats = ProxyStats()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- control
    @property
    def mode(self) -> FaultMode:
        """The current fault mode."""
        return self._mode

    def set_mode(
        self,
        mode: FaultMode | str,
        *,
        latency_s: float | None = None,
        bandwidth_bps: float | None = None,
    ) -> None:
        """Switch the fault mode; takes effect for data in flight at once.

        Args:
            mode: the new mode (a :class:`FaultMode` or its value).
            latency_s: added one-way delay for ``LATENCY``, seconds.
            bandwidth_bps: per-direction cap for ``BANDWIDTH``, bytes/s.

        Raises:
            ValueError: an unknown mode or a negative/missing parameter.
        """
        mode = FaultMode(mode)
        if latency_s is not None:
            if latency_s < 0:
                raise ValueError(f"latency_s must be >= 0, got {latency_s}")
            self.latency_s = latency_s
        if bandwidth_bps is not None:
            if bandwidth_bps <= 0:
                raise ValueError(f"bandwidth_bps must be > 0, got {bandwidth_bps}")
            self.bandwidth_bps = bandwidth_bps
        if mode is FaultMode.BANDWIDTH and self.bandwidth_bps <= 0:
            raise ValueError("BANDWIDTH mode needs bandwidth_bps > 0")
        with self._lock:
            self._mode = mode
        log.info("fault proxy %s: mode %s", self.port, mode.value)
        if mode is FaultMode.RESET and self._loop is not None:
            self._loop.call_soon_threadsafe(self._reset_all)

    def passthrough(self) -> None:
        """Forward traffic unchanged (alias: :meth:`heal`)."""
        self.set_mode(FaultMode.PASS)

    heal = passthrough

    def blackhole(self) -> None:
        """Accept and read, forward nothing."""
        self.set_mode(FaultMode.BLACKHOLE)

    def reset(self) -> None:
        """Close all connections now and refuse new ones until the mode changes."""
        self.set_mode(FaultMode.RESET)

    def latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds``."""
        self.set_mode(FaultMode.LATENCY, latency_s=seconds)

    def bandwidth(self, bytes_per_s: float) -> None:
        """Cap each direction of each connection at ``bytes_per_s``."""
        self.set_mode(FaultMode.BANDWIDTH, bandwidth_bps=bytes_per_s)

    def stats(self) -> ProxyStats:
        """Return a snapshot of the counters."""
        s = self._stats
        return ProxyStats(
            connections_accepted=s.connections_accepted,
            connections_open=s.connections_open,
            connections_reset=s.connections_reset,
            bytes_upstream=s.bytes_upstream,
            bytes_downstream=s.bytes_downstream,
            bytes_dropped=s.bytes_dropped,
        )

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 5.0) -> FaultProxy:
        """Start listening in a background thread; returns self."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            self._thread = None
            cause = errors[0] if errors else TimeoutError("no answer")
            raise OSError(f"fault proxy could not listen on {self.host}:{self.port}: {cause}")
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and end the thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all(count=False)
            tasks = [t for link in list(self._links) for t in link.tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``mqtt://host:port`` to give clients instead of the broker's."""
        return f"mqtt://{self.host}:{self.port}"

    # ---------------------------------------------------------------- internals
    def _reset_all(self, count: bool = True) -> None:
        for link in list(self._links):
            link.abort()
            if count:
                self._stats.connections_reset += 1

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._stats.connections_accepted += 1
        if self._mode is FaultMode.RESET:
            self._stats.connections_reset += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        link = _Link(self, (reader, writer), (up_reader, up_writer))
        if self._mode is FaultMode.BLACKHOLE:
            link.dead = True
        self._links.add(link)
        self._stats.connections_open += 1
        link.tasks = [
            asyncio.create_task(link.pump(reader, up_writer, upstream=True)),
            asyncio.create_task(link.pump(up_reader, writer, upstream=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.abort()
            self._links.discard(link)
            self._stats.connections_open -= 1
