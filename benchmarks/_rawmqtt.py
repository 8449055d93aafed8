"""A minimal MQTT 3.1.1 client for the scale benchmark's load generator only.

The devices of a real fleet are separate machines; in ``edgefl bench scale``
they are this machine's processes, sharing its two cores with the broker and
the aggregator. A paho client spends about 70 us of CPU per published
message and over 100 us per received one (its callback machinery and
locking), CPU the aggregator then does not get. This client writes
pre-encoded ``PUBLISH`` packets straight to a socket and reads ``PUBACK`` /
``PUBLISH`` packets with a few slices, so the load costs the machine
almost nothing but the broker's own work. The bytes on the wire are ordinary
MQTT 3.1.1 packets: the broker and the aggregator see exactly what paho
would send (QoS 1, a packet identifier each).

Never used by the product: devices speak MQTT through ``edge_sdk.transport``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

__all__ = ["RawPublisher", "RawSubscriber"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def _connect(url: str, client_id: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"the raw load client speaks plain TCP only, not {url!r}")
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 1883), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # protocol name, level 4 (3.1.1), clean session, keep-alive 0 (none)
    body = _utf8("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + _utf8(client_id)
    sock.sendall(_packet(0x10, body))
    ack = _read_exact(sock, 4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"broker refused the load client {client_id!r}: {ack.hex()}")
    return sock


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError("broker closed the connection")
        out += got
    return bytes(out)


class _Packets:
    """Splits a byte stream into MQTT packets (fixed header, remaining length)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        buf = self.buf
        while True:
            if len(buf) - pos < 2:
                break
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= len(buf):
                    length = -1
                    break
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if length < 0 or i + length > len(buf):
                break
            out.append((buf[pos], bytes(buf[i : i + length])))
            pos = i + length
        del buf[:pos]
        return out


class RawPublisher:
    """Publishes pre-built messages at QoS 1 and waits for every ``PUBACK``."""

    def __init__(self, url: str, client_id: str, *, timeout: float = 30.0) -> None:
        """Connect (CONNECT/CONNACK) at once."""
        self.sock = _connect(url, client_id, timeout)
        self.timeout = timeout

    def publish_all(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Send every ``(topic, payload)``; returns once the broker acknowledged all."""
        packets = []
        items = list(messages)
        if len(items) > 65535:  # packet identifiers would be reused while in flight
            raise ValueError(f"at most 65,535 messages per publisher, got {len(items)}")
        for i, (topic, payload) in enumerate(items):
            pid = i + 1
            packets.append(_packet(0x32, _utf8(topic) + pid.to_bytes(2, "big") + payload))
        want = len(packets)
        acked = 0
        failure: list[BaseException] = []

        def read_acks() -> None:
            nonlocal acked
            parser = _Packets()
            try:
                while acked < want:
                    data = self.sock.recv(65536)
                    if not data:
                        raise ConnectionError("broker closed the connection")
                    acked += sum(1 for kind, _ in parser.feed(data) if kind == 0x40)
            except BaseException as exc:  # reported to the caller below
                failure.append(exc)

        self.sock.settimeout(self.timeout)
        reader = threading.Thread(target=read_acks, daemon=True)
        reader.start()
        batch: list[bytes] = []
        for packet in packets:
            batch.append(packet)
            if len(batch) >= 64:
                self.sock.sendall(b"".join(batch))
                batch = []
        if batch:
            self.sock.sendall(b"".join(batch))
        reader.join(self.timeout + 60)
        if failure:
            raise ConnectionError(f"publishing failed after {acked}/{want} acks: {failure[0]}")
        if acked < want:
            raise TimeoutError(f"only {acked}/{want} publications acknowledged")
        return acked

    def close(self) -> None:
        """Send DISCONNECT and close the socket."""
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()


class RawSubscriber:
    """Receives QoS 1 messages on one filter, acknowledging each; records arrival times.

    ``on_message(topic, payload, t)`` runs on the reader thread with
    ``t = time.perf_counter()`` at arrival.
    """

    def __init__(self, url: str, client_id: str, *, timeout: float = 30.0) -> None:
        """Connect (CONNECT/CONNACK) at once; :meth:`subscribe` then starts reading."""
        self.sock = _connect(url, client_id, timeout)
        self.sock.settimeout(None)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: BaseException | None = None

    def subscribe(
        self,
        topic_filter: str,
        on_message: Callable[[str, bytes, float], None],
        timeout: float = 30.0,
    ) -> None:
        """SUBSCRIBE at QoS 1, wait for the SUBACK, then read on a daemon thread."""
        self.sock.sendall(_packet(0x82, (1).to_bytes(2, "big") + _utf8(topic_filter) + b"\x01"))
        parser = _Packets()
        pending: list[tuple[int, bytes]] = []
        end = time.monotonic() + timeout
        while not any(kind == 0x90 for kind, _ in pending):
            if time.monotonic() > end:
                raise TimeoutError("no SUBACK")
            pending += parser.feed(self.sock.recv(65536))
        suback = next(body for kind, body in pending if kind == 0x90)
        if suback[2:3] not in (b"\x00", b"\x01"):
            raise ConnectionError(f"subscription to {topic_filter!r} refused")
        callback = on_message
        leftover = [(k, b) for k, b in pending if k != 0x90]

        def run() -> None:
            try:
                self._deliver(leftover, callback)
                while not self._closed:
                    data = self.sock.recv(262144)
                    if not data:
                        return
                    self._deliver(parser.feed(data), callback)
            except OSError as exc:
                if not self._closed:
                    self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _deliver(
        self, packets: list[tuple[int, bytes]], callback: Callable[[str, bytes, float], None]
    ) -> None:
        now = time.perf_counter()
        acks = []
        for kind, body in packets:
            if kind >> 4 != 3:
                continue
            n = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + n].decode()
            pos = 2 + n
            if (kind >> 1) & 3:
                acks.append(b"\x40\x02" + body[pos : pos + 2])
                pos += 2
            callback(topic, body[pos:], now)
        if acks:
            self.sock.sendall(b"".join(acks))

    def close(self) -> None:
        """Disconnect and stop reading."""
        self._closed = True
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._thread is not None:
            self._thread.join(5)
