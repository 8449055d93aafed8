"""The generated password file and ACL on a real Mosquitto, through MqttTransport (MQTT 5).

Negative checks do not sleep: after the message that must not arrive, a
marker is sent along a path that is allowed, and the test inspects what
arrived before the marker.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.transport import (
    ConnectRefusedError,
    MqttTransport,
    NotConnectedError,
    SubscriptionRefusedError,
    TransportConfig,
)
from firmware_sim.acl import BrokerAuth, generate_broker_auth
from firmware_sim.broker import MosquittoBroker, MosquittoOptions, find_mosquitto
from tests.test_transport_contract import WAIT, Inbox

pytestmark = pytest.mark.broker

FED = "fed"
P = f"edgefl/v1/{FED}/"


@dataclass
class Secured:
    broker: MosquittoBroker
    auth: BrokerAuth
    folder: Path
    made: list[MqttTransport]

    def client(self, user: str, *, password: str | None = None, **settings: Any) -> MqttTransport:
        cfg = TransportConfig(
            url=self.broker.url,
            client_id=f"{user}-{uuid.uuid4().hex[:6]}",
            username=user,
            password=password if password is not None else self.auth.passwords[user],
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            connect_timeout=5.0,
            **settings,
        )
        transport = MqttTransport(cfg)
        self.made.append(transport)
        return transport

    def connected(self, user: str, **settings: Any) -> MqttTransport:
        transport = self.client(user, **settings)
        transport.connect(timeout=WAIT)
        return transport


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    """Mosquitto with the generated password file and ACL for devices dA and dB."""
    if find_mosquitto() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI requires Mosquitto")
        pytest.skip("mosquitto is not installed")
    auth = generate_broker_auth(FED, ["dA", "dB"])
    files = auth.write(tmp_path / "auth")
    options = MosquittoOptions(password_file=files.password_file, acl_file=files.acl_file)
    broker = MosquittoBroker(workdir=tmp_path / "m", options=options)
    broker.start()
    env = Secured(broker=broker, auth=auth, folder=tmp_path / "auth", made=[])
    try:
        yield env
    finally:
        for transport in env.made:
            transport.close()
        broker.stop()


def _subscribe_recording(
    transport: MqttTransport, topic_filter: str, inbox: Inbox, record: Any
) -> int:
    """Subscribe; return the SUBACK code whether granted or refused, and record it."""
    try:
        transport.subscribe(topic_filter, inbox)
        code = transport.suback_code(topic_filter)
    except SubscriptionRefusedError as exc:
        code = exc.code
    assert code is not None
    record(f"suback {topic_filter}", hex(code))
    return code


def test_device_receives_nothing_from_another_devices_update_topic(
    secured: Secured, record_property: Any
) -> None:
    spy = Inbox()
    a = secured.connected("dA")
    code = _subscribe_recording(a, P + "updates/dB", spy, record_property)
    # Mosquitto 2.0 grants the SUBACK and filters on delivery; newer versions
    # may refuse it (>= 0x80). Either way nothing may reach A.
    assert code in (0, 1) or code >= 0x80
    a.subscribe(P + "ack/dA", spy)
    agg_inbox = Inbox()
    agg = secured.connected("aggregator")
    agg.subscribe(P + "updates/+", agg_inbox)
    b = secured.connected("dB")
    b.publish(P + "updates/dB", b"B's update")
    assert agg_inbox.get().payload == b"B's update"  # it was published and routed
    agg.publish(P + "ack/dA", b"marker")
    assert spy.until(b"marker") == []


def test_forged_publish_is_dropped_and_own_topic_is_delivered(secured: Secured) -> None:
    agg_inbox = Inbox()
    agg = secured.connected("aggregator")
    agg.subscribe(P + "updates/+", agg_inbox)
    a = secured.connected("dA")
    a.publish(P + "updates/dB", b"forged as B")
    a.publish(P + "updates/dA", b"A's own")
    assert a.flush(WAIT)
    got = agg_inbox.until(b"A's own")
    assert got == []
    assert a.refused_publishes == 1  # MQTT 5 PUBACK "Not authorized" for the forgery
    assert a.connected


def test_device_cannot_read_another_devices_receipts(secured: Secured) -> None:
    spy = Inbox()
    a = secured.connected("dA")
    with contextlib.suppress(SubscriptionRefusedError):  # refusing is as good as filtering
        a.subscribe(P + "ack/dB", spy)
    a.subscribe(P + "ack/dA", spy)
    agg = secured.connected("aggregator")
    agg.publish(P + "ack/dB", b"receipt for B")
    agg.publish(P + "ack/dA", b"marker")
    assert spy.until(b"marker") == []


def test_device_cannot_impersonate_the_aggregator_or_the_key_holder(secured: Secured) -> None:
    model, keyholder_inbox, device_spy = Inbox(), Inbox(), Inbox()
    agg = secured.connected("aggregator")
    agg.publish(P + "model/0", b"real model", retain=True)
    assert agg.flush(WAIT)
    b = secured.connected("dB")
    b.subscribe(P + "model/0", model)
    assert model.get().payload == b"real model"
    a = secured.connected("dA")
    a.publish(P + "model/0", b"fake model", retain=True)
    a.publish(P + "keyholder/result", b"fake aggregate")
    assert a.flush(WAIT)
    assert a.refused_publishes == 2
    kh = secured.connected("keyholder")
    kh.subscribe(P + "keyholder/request", keyholder_inbox)
    with contextlib.suppress(SubscriptionRefusedError):
        a.subscribe(P + "keyholder/#", device_spy)
    a.subscribe(P + "ack/dA", device_spy)
    agg.publish(P + "keyholder/request", b"Enc(sum)")
    assert keyholder_inbox.get().payload == b"Enc(sum)"
    agg.publish(P + "model/0", b"model 2", retain=True)
    agg.publish(P + "ack/dA", b"marker")
    assert [m.payload for m in model.until(b"model 2")] == []
    assert device_spy.until(b"marker") == []
    # a late subscriber sees the aggregator's retained model, not the forgery
    late = Inbox()
    secured.connected("dA").subscribe(P + "model/0", late)
    assert late.get().payload == b"model 2"


@pytest.mark.parametrize(
    ("user", "password"),
    [("dA", "wrong password"), ("nobody", "whatever"), ("dA", None)],
)
def test_bad_credentials_are_refused(secured: Secured, user: str, password: str | None) -> None:
    if password is None:  # the other device's valid password
        password = secured.auth.passwords["dB"]
    client = secured.client(user, password=password)
    with pytest.raises(ConnectRefusedError) as info:
        client.connect(timeout=WAIT)
    assert info.value.code in (0x86, 0x87)  # bad user name or password / not authorized
    assert not client.connected


def test_anonymous_clients_are_refused(secured: Secured) -> None:
    cfg = TransportConfig(url=secured.broker.url, client_id="anon", connect_timeout=5.0)
    anonymous = MqttTransport(cfg)
    secured.made.append(anonymous)
    with pytest.raises(ConnectRefusedError):
        anonymous.connect(timeout=WAIT)


def test_reload_applies_a_narrowed_acl(secured: Secured) -> None:
    agg_inbox = Inbox()
    agg = secured.connected("aggregator")
    agg.subscribe(P + "updates/+", agg_inbox)
    b = secured.connected("dB")
    b.publish(P + "updates/dB", b"before")
    assert agg_inbox.get().payload == b"before"
    # remove dB, keep everyone else's password, rewrite in place, SIGHUP
    kept = {u: p for u, p in secured.auth.passwords.items() if u != "dB"}
    narrowed = generate_broker_auth(FED, ["dA"], passwords=kept)
    narrowed.write(secured.folder)
    secured.broker.reload()
    # wait for Mosquitto to apply it: a fresh dB login is refused once reloaded
    deadline = time.monotonic() + WAIT
    while True:
        probe = secured.client("dB")
        try:
            probe.connect(timeout=5)
        except ConnectRefusedError:
            probe.close()
            break
        probe.close()
        assert time.monotonic() < deadline, "reload never applied"
        time.sleep(0.1)
    # the still-connected dB can no longer publish; dA, kept, still can
    # Mosquitto 2.0 usually keeps existing connections on reload, but may drop
    # one (seen in CI: dB disconnected between the check and the ack, then
    # refused at every reconnect). Either way nothing of dB's may arrive (below).
    if b.connected:
        try:
            b.publish(P + "updates/dB", b"after removal")
        except NotConnectedError:
            assert not b.connected
        else:
            if b.flush(WAIT):
                assert b.refused_publishes == 1
            else:
                assert not b.connected  # dropped before the ack
    a = secured.connected("dA")
    a.publish(P + "updates/dA", b"marker")
    assert agg_inbox.until(b"marker") == []
