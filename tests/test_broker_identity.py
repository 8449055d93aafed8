"""Broker identity binding on a real Mosquitto: certificate CN = ACL user = client id.

The broker runs the harness's mutual-TLS listener (``require_certificate``,
``use_identity_as_username``, ``use_username_as_clientid``), the ACL from
:func:`firmware_sim.acl.acl_grants` with a committee of three key holders,
and the CRL; every certificate comes from ``edgefl pki``. Clients are plain
paho (MQTT 5), so the tests see CONNACK, PUBACK and DISCONNECT reason codes
and choose their client ids freely, as an attacker would.

Issue 13 (4) was a client-id takeover: a device presenting its OWN valid
certificate with the aggregator's client id disconnected the aggregator and
drained its durable session. Here the victim must stay connected and keep
receiving its QoS 1 messages, and the intruder gets only its own session.

Negative checks do not sleep: a marker published along an allowed path (or
a retained message delivered after the SUBACK) shows what arrived before it.
"""

from __future__ import annotations

import os
import pwd
import queue
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_sdk.cli import main
from firmware_sim.acl import acl_grants, keyholder_result_topic, render_acl
from firmware_sim.broker import MosquittoBroker, MosquittoOptions, TlsListener, find_mosquitto
from firmware_sim.pki import CertificateAuthority

pytestmark = pytest.mark.broker

FED = "idfed"
P = f"edgefl/v1/{FED}/"
WAIT = 10.0
HOLDERS = ("keyholder-1", "keyholder-2", "keyholder-3")
DEVICES = ("dA", "dB")
NOT_AUTHORIZED = 0x87
NO_MATCHING_SUBSCRIBERS = 0x10  # a success: accepted, nobody subscribed


def _pki(*args: str) -> None:
    assert main(["pki", *args], only=["pki"]) == 0


class Peer:
    """One paho MQTT 5 client over mutual TLS, recording what happens to it."""

    def __init__(
        self,
        port: int,
        ca_file: Path,
        cert: Path,
        key: Path,
        client_id: str,
        *,
        durable: bool = False,
    ) -> None:
        self.port = port
        self.client_id = client_id
        self.durable = durable
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(ca_file),
            certfile=str(cert),
            keyfile=str(key),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connacks: list[tuple[int, bool]] = []
        self.disconnects: list[int] = []
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self._event = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self._started = False

    # paho callbacks (its network thread)
    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._event:
            self.connacks.append((rc.value, bool(flags.session_present)))
            self._event.notify_all()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._event:
            self.disconnects.append(rc.value)
            self._event.notify_all()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self._event:
            self.pubacks[mid] = rc.value
            self._event.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        with self._event:
            self.subacks[mid] = [code.value for code in codes]
            self._event.notify_all()

    def _wait(self, predicate: Any, timeout: float = WAIT) -> bool:
        with self._event:
            return bool(self._event.wait_for(predicate, timeout))

    def connect(self, timeout: float = WAIT) -> bool:
        """Connect; True once a successful CONNACK arrived, False when refused or timed out."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.durable:
            props.SessionExpiryInterval = 3600
        try:
            self.client.connect(
                "127.0.0.1", self.port, keepalive=30, clean_start=not self.durable, properties=props
            )
        except (OSError, ssl.SSLError):
            return False
        if not self._started:
            self.client.loop_start()
            self._started = True
        ok = self._wait(lambda: any(rc == 0 for rc, _ in self.connacks) or self.disconnects)
        return ok and any(rc == 0 for rc, _ in self.connacks)

    @property
    def session_present(self) -> bool:
        return self.connacks[-1][1]

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        assert self._wait(lambda: mid in self.subacks), f"no SUBACK for {topic}"
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0: accepted)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert self._wait(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        code = self.pubacks[info.mid]
        return 0 if code == NO_MATCHING_SUBSCRIBERS else code

    def get(self, timeout: float = WAIT) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def until(self, marker: bytes) -> list[tuple[str, bytes]]:
        """Messages received before ``marker`` (which must arrive)."""
        seen: list[tuple[str, bytes]] = []
        while True:
            topic, payload = self.get()
            if payload == marker:
                return seen
            seen.append((topic, payload))

    def close(self) -> None:
        self.client.disconnect()
        if self._started:
            self.client.loop_stop()
            self._started = False


@dataclass
class Federation:
    broker: MosquittoBroker
    ca: CertificateAuthority
    peers: list[Peer] = field(default_factory=list)

    def peer(self, cert_id: str, client_id: str | None = None, **kw: Any) -> Peer:
        assert self.broker.tls_port
        peer = Peer(
            self.broker.tls_port,
            self.ca.ca_cert,
            self.ca.cert_path(cert_id),
            self.ca.key_path(cert_id),
            client_id or cert_id,
            **kw,
        )
        self.peers.append(peer)
        return peer

    def connected(self, cert_id: str, client_id: str | None = None, **kw: Any) -> Peer:
        peer = self.peer(cert_id, client_id, **kw)
        assert peer.connect(), f"{cert_id} as {client_id or cert_id} could not connect"
        return peer

    def log_lines(self, needle: str) -> list[str]:
        return [ln for ln in self.broker.log_text().splitlines() if needle in ln]


def _require_mosquitto() -> None:
    from tests.conftest import _require_mosquitto as require

    require()


def _make_pki(folder: Path) -> CertificateAuthority:
    d = str(folder)
    _pki("init", "--dir", d)
    _pki("issue", "--dir", d, "--role", "broker", "--id", "broker", "--dns", "broker.test")
    _pki("issue", "--dir", d, "--role", "aggregator", "--id", "aggregator")
    for holder in HOLDERS:
        _pki("issue", "--dir", d, "--role", "keyholder", "--id", holder)
    for device in (*DEVICES, "dRevoked"):
        _pki("issue", "--dir", d, "--role", "device", "--id", device)
    return CertificateAuthority(folder)


@pytest.fixture
def fed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Federation]:
    """Mosquitto with mutual TLS, identity binding, the generated ACL and CRL."""
    _require_mosquitto()
    ca = _make_pki(tmp_path / "ca")
    capsys.readouterr()
    acl = tmp_path / "acl"
    grants = acl_grants(FED, [*DEVICES, "dRevoked"], keyholders=HOLDERS)
    acl.write_text(render_acl(grants, federation=FED))
    options = MosquittoOptions(
        acl_file=acl,
        tls=TlsListener(
            certfile=ca.cert_path("broker"),
            keyfile=ca.key_path("broker"),
            cafile=ca.ca_cert,
            crlfile=ca.crl_file,
        ),
    )
    broker = MosquittoBroker(workdir=tmp_path / "m", options=options)
    broker.start()
    env = Federation(broker=broker, ca=ca)
    try:
        yield env
    finally:
        for peer in env.peers:
            peer.close()
        broker.stop()


# ----------------------------------------------------- client-id takeover


def test_device_using_the_aggregators_client_id_does_not_kick_the_aggregator(
    fed: Federation,
) -> None:
    agg = fed.connected("aggregator", durable=True)
    agg.subscribe(P + "updates/+")
    b = fed.connected("dB")
    for attempt in range(10):  # the finding: 15 logins in 30 s against the victim
        intruder = fed.peer("dA", client_id="aggregator", durable=True)
        if intruder.connect():
            # connected, but as itself: its own session (new at first), not the aggregator's
            assert intruder.session_present == (attempt > 0)
            assert intruder.publish(P + "updates/dA", b"intruder %d" % attempt) == 0
        intruder.close()
        assert b.publish(P + "updates/dB", b"update %d" % attempt) == 0
    got = [agg.get()[1] for _ in range(20)]
    assert sorted(got) == sorted(
        [b"update %d" % i for i in range(10)] + [b"intruder %d" % i for i in range(10)]
    )
    assert agg.disconnects == []
    assert len(agg.connacks) == 1  # never kicked, never had to reconnect
    assert fed.log_lines("Client aggregator already connected") == []
    assert all("u'dA'" in ln for ln in fed.log_lines(" as dA "))
    assert all("u'aggregator'" in ln for ln in fed.log_lines(" as aggregator "))


def test_intruder_does_not_drain_the_aggregators_queued_messages(fed: Federation) -> None:
    agg = fed.connected("aggregator", durable=True)
    agg.subscribe(P + "updates/+")
    assert agg.publish(P + "model/0", b"retained marker", retain=True) == 0
    agg.close()  # offline; the broker queues its QoS 1 messages in the durable session
    b = fed.connected("dB")
    for i in range(3):
        assert b.publish(P + "updates/dB", b"queued %d" % i) == 0
    intruder = fed.connected("dA", client_id="aggregator", durable=True)
    assert not intruder.session_present  # the aggregator's session was not handed over
    intruder.subscribe(P + "model/0")
    # queued session messages would come right after CONNACK, before this retained one
    assert intruder.until(b"retained marker") == []
    intruder.close()
    back = fed.connected("aggregator", durable=True)
    assert back.session_present
    assert sorted(back.get()[1] for _ in range(3)) == [b"queued 0", b"queued 1", b"queued 2"]


def test_device_using_another_devices_client_id_does_not_kick_it(fed: Federation) -> None:
    b = fed.connected("dB")
    b.subscribe(P + "ack/dB")
    agg = fed.connected("aggregator")
    for attempt in range(5):
        intruder = fed.peer("dA", client_id="dB")
        if intruder.connect():
            # as dA it cannot read dB's receipts, whatever client id it claimed
            intruder.subscribe(P + "ack/dB")
            intruder.subscribe(P + "ack/dA")
            assert agg.publish(P + "ack/dB", b"receipt %d" % attempt) == 0
            assert agg.publish(P + "ack/dA", b"marker") == 0
            assert intruder.until(b"marker") == []
        else:
            assert agg.publish(P + "ack/dB", b"receipt %d" % attempt) == 0
        intruder.close()
    assert [b.get()[1] for _ in range(5)] == [b"receipt %d" % i for i in range(5)]
    assert b.disconnects == [] and len(b.connacks) == 1
    assert fed.log_lines("Client dB already connected") == []


def test_a_key_holder_cannot_take_over_another_holders_session(fed: Federation) -> None:
    one = fed.connected("keyholder-1", durable=True)
    one.subscribe(P + "keyholder/request")
    two = fed.connected("keyholder-2", client_id="keyholder-1", durable=True)
    assert not two.session_present
    agg = fed.connected("aggregator")
    assert agg.publish(P + "keyholder/request", b"Enc(sum)") == 0
    assert one.get()[1] == b"Enc(sum)"
    assert one.disconnects == []


# ------------------------------------------------ certificates and the CRL


def test_revoked_certificate_is_refused_after_crl_rewrite_and_reload(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fed.peer("dRevoked")
    assert before.connect()
    before.close()
    _pki("revoke", "--dir", str(fed.ca.folder), "--id", "dRevoked")
    _pki("crl", "--dir", str(fed.ca.folder))
    capsys.readouterr()
    fed.broker.reload()  # SIGHUP: Mosquitto 2.0.11 re-reads the crlfile
    deadline = time.monotonic() + WAIT
    while True:
        probe = fed.peer("dRevoked", client_id=f"probe-{uuid.uuid4().hex[:6]}")
        refused = not probe.connect(timeout=3)
        probe.close()
        if refused:
            break
        assert time.monotonic() < deadline, "the reloaded CRL never took effect"
        time.sleep(0.1)
    assert fed.log_lines("certificate verify failed")
    # only that certificate: a valid one still connects
    assert fed.connected("dA").connacks[-1][0] == 0


def test_revoked_party_dropped_from_the_acl_cannot_publish_on_its_open_connection(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CRL is checked at the handshake only; the open connection of a
    # revoked party is cut off by regenerating the ACL without it (as
    # `edgefl pki mosquitto` does) and reloading.
    agg = fed.connected("aggregator")
    agg.subscribe(P + "updates/+")
    stolen = fed.connected("dRevoked")
    assert stolen.publish(P + "updates/dRevoked", b"before") == 0
    assert agg.get()[1] == b"before"
    _pki("revoke", "--dir", str(fed.ca.folder), "--id", "dRevoked")
    capsys.readouterr()
    grants = acl_grants(FED, list(DEVICES), keyholders=HOLDERS)
    acl = fed.broker.options.acl_file
    assert acl is not None
    acl.write_text(render_acl(grants, federation=FED))
    fed.broker.reload()
    deadline = time.monotonic() + WAIT
    while stolen.publish(P + "updates/dRevoked", b"after") != NOT_AUTHORIZED:
        assert time.monotonic() < deadline, "the reloaded ACL never took effect"
        time.sleep(0.1)
    a = fed.connected("dA")
    assert a.publish(P + "updates/dA", b"marker") == 0
    # only publishes accepted before the reload applied can have arrived
    assert {payload for _, payload in agg.until(b"marker")} <= {b"after"}


def test_an_expired_crl_locks_every_certificate_out(fed: Federation) -> None:
    # Why the CRL must be rewritten (`edgefl pki crl`) before its next update.
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key(fed.ca.ca_key.read_bytes(), password=None)
    now = dt.datetime.now(dt.timezone.utc)
    expired = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(fed.ca.certificate.subject)
        .last_update(now - dt.timedelta(days=2))
        .next_update(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    assert fed.connected("dA").connacks[-1][0] == 0
    fed.ca.crl_file.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    fed.broker.reload()
    deadline = time.monotonic() + WAIT
    while True:
        probe = fed.peer("aggregator")
        refused = not probe.connect(timeout=3)
        probe.close()
        if refused:
            break
        assert time.monotonic() < deadline, "the expired CRL was never applied"
        time.sleep(0.1)
    fed.ca.write_crl()  # a fresh CRL lets everyone back in
    fed.broker.reload()
    deadline = time.monotonic() + WAIT
    while True:
        probe = fed.peer("aggregator")
        back = probe.connect(timeout=3)
        probe.close()
        if back:
            break
        assert time.monotonic() < deadline, "the fresh CRL was never applied"
        time.sleep(0.1)


def test_certificate_from_another_ca_is_refused(fed: Federation, tmp_path: Path) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue", name="rogue CA")
    fake = rogue.issue("aggregator", "aggregator")  # the right CN, the wrong issuer
    assert fed.broker.tls_port
    impostor = Peer(fed.broker.tls_port, fed.ca.ca_cert, fake.cert, fake.key, "aggregator")
    fed.peers.append(impostor)
    assert not impostor.connect(timeout=3)
    assert impostor.connacks == []


def test_server_certificate_is_not_accepted_as_a_client_certificate(fed: Federation) -> None:
    broker_cert = fed.peer("broker", client_id="aggregator")  # serverAuth only
    assert not broker_cert.connect(timeout=3)


# ------------------------------------------------------------ ACL per role


def test_each_role_publishes_and_reads_only_what_the_acl_allows(fed: Federation) -> None:
    agg = fed.connected("aggregator")
    agg.subscribe(P + "updates/+")
    agg.subscribe(keyholder_result_topic(FED, "+"))
    holders = {h: fed.connected(h) for h in HOLDERS}
    for holder in holders.values():
        holder.subscribe(P + "keyholder/request")
        holder.subscribe(P + "updates/+")
    a = fed.connected("dA")
    a.subscribe(P + "ack/dA")
    # devices: own update only; nothing of the services'
    assert a.publish(P + "updates/dA", b"A's update") == 0
    assert a.publish(P + "updates/dB", b"forged B") == NOT_AUTHORIZED
    assert a.publish(keyholder_result_topic(FED, "keyholder-1"), b"fake result") == NOT_AUTHORIZED
    assert a.publish(P + "keyholder/request", b"fake request") == NOT_AUTHORIZED
    assert a.publish(P + "model/0", b"fake model") == NOT_AUTHORIZED
    # key holders: only their own result topic, never updates or requests
    one = holders["keyholder-1"]
    assert one.publish(keyholder_result_topic(FED, "keyholder-1"), b"result of 1") == 0
    assert one.publish(keyholder_result_topic(FED, "keyholder-2"), b"1 as 2") == NOT_AUTHORIZED
    assert one.publish(P + "updates/dA", b"holder update") == NOT_AUTHORIZED
    assert one.publish(P + "keyholder/request", b"holder request") == NOT_AUTHORIZED
    # the aggregator: requests and receipts, never results or updates
    assert agg.publish(keyholder_result_topic(FED, "keyholder-3"), b"agg result") == (
        NOT_AUTHORIZED
    )
    assert agg.publish(P + "updates/dA", b"agg update") == NOT_AUTHORIZED
    assert agg.publish(P + "keyholder/request", b"Enc(sum)") == 0
    assert agg.publish(P + "ack/dA", b"receipt A") == 0
    # what arrived: markers close each inbox
    assert holders["keyholder-3"].publish(keyholder_result_topic(FED, "keyholder-3"), b"end") == 0
    agg_seen = [payload for _, payload in agg.until(b"end")]
    assert agg_seen == [b"A's update", b"result of 1"]
    for holder in holders.values():
        got = [payload for _, payload in holder.until(b"Enc(sum)")]
        assert got == [b"A's update"]  # the witness copy; no forgeries
    assert a.until(b"receipt A") == []
    # a device cannot read results, requests, other updates or receipts
    spy = fed.connected("dB")
    for topic in (P + "keyholder/#", P + "updates/+", P + "ack/+"):
        spy.subscribe(topic)
    spy.subscribe(P + "ack/dB")
    assert one.publish(keyholder_result_topic(FED, "keyholder-1"), b"second result") == 0
    assert agg.publish(P + "keyholder/request", b"second request") == 0
    assert a.publish(P + "updates/dA", b"second update") == 0
    assert agg.publish(P + "ack/dA", b"second receipt") == 0
    assert agg.publish(P + "ack/dB", b"marker") == 0
    assert spy.until(b"marker") == []


# -------------------------------- the production config `edgefl pki mosquitto`


def test_generated_mosquitto_conf_runs_and_binds_identities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_mosquitto()
    exe = find_mosquitto()
    assert exe is not None
    ca = _make_pki(tmp_path / "ca")
    out = tmp_path / "broker"
    from firmware_sim.broker import free_port

    port = free_port()
    _pki(
        "mosquitto",
        "--dir",
        str(ca.folder),
        "--federation",
        FED,
        "--out",
        str(out),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--persistence",
        str(tmp_path / "persist"),
    )
    capsys.readouterr()
    conf = out / "mosquitto.conf"
    # run as this user (Mosquitto started as root would switch to user "mosquitto")
    user = pwd.getpwuid(os.geteuid()).pw_name
    conf.write_text(conf.read_text() + f"user {user}\nlog_dest stderr\nlog_type all\n")
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(exe), "-c", str(conf)], stdout=sink, stderr=subprocess.STDOUT)
    peers: list[Peer] = []
    try:

        def peer(cert_id: str, client_id: str, **kw: Any) -> Peer:
            made = Peer(
                port,
                out / "ca.crt",
                ca.cert_path(cert_id),
                ca.key_path(cert_id),
                client_id,
                **kw,
            )
            peers.append(made)
            return made

        deadline = time.monotonic() + WAIT
        agg = peer("aggregator", "aggregator", durable=True)
        while not agg.connect(timeout=1):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            agg.close()
            agg = peer("aggregator", "aggregator", durable=True)
            time.sleep(0.1)
        agg.subscribe(P + "updates/+")
        intruder = peer("dA", "aggregator")
        if intruder.connect():
            assert intruder.publish(P + "updates/dA", b"as itself") == 0
            assert intruder.publish(P + "model/0", b"as the aggregator") == NOT_AUTHORIZED
        assert agg.get()[1] == b"as itself"
        assert agg.disconnects == []
        assert "already connected" not in log.read_text()
    finally:
        for made in peers:
            made.close()
        proc.terminate()
        proc.wait(10)


def test_ed25519_certificates_work_with_this_mosquitto(tmp_path: Path) -> None:
    _require_mosquitto()
    ca = CertificateAuthority.init(tmp_path / "ca", key_type="ed25519")
    ca.issue("broker", "broker")
    ca.issue("aggregator", "aggregator")
    ca.issue("device", "dA")
    acl = tmp_path / "acl"
    acl.write_text(render_acl(acl_grants(FED, ["dA"]), federation=FED))
    options = MosquittoOptions(
        acl_file=acl,
        tls=TlsListener(
            certfile=ca.cert_path("broker"),
            keyfile=ca.key_path("broker"),
            cafile=ca.ca_cert,
            crlfile=ca.crl_file,
        ),
    )
    broker = MosquittoBroker(workdir=tmp_path / "m", options=options)
    broker.start()
    env = Federation(broker=broker, ca=ca)
    try:
        agg = env.connected("aggregator")
        agg.subscribe(P + "updates/+")
        assert env.connected("dA", client_id="aggregator").publish(P + "updates/dA", b"ed") == 0
        assert agg.get()[1] == b"ed"
        assert agg.disconnects == []
    finally:
        for peer in env.peers:
            peer.close()
        broker.stop()
