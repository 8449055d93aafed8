"""The service over the in-memory broker: receipts, retained state, acks after commit,
re-publish on restart, remote key holder, status CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.keyholder_service import KeyholderService
from aggregator.rounds import round_outcome
from aggregator.service import AggregatorService
from aggregator.store import AggregatorStore
from edge_sdk.cli import main as cli_main
from edge_sdk.identity import DeviceIdentity
from edge_sdk.protocol import (
    Chunk,
    EncryptedUpdate,
    GlobalModel,
    Reassembler,
    Receipt,
    RoundAnnouncement,
    Topics,
)
from edge_sdk.transport import InboundMessage, MemoryBroker, MemoryTransport
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import (
    FED,
    Fleet,
    deltas,
    make_keyholders,
    make_machine,
    make_update,
    update_messages,
)

keypair = _support.keypair  # session fixture

DIM = 40
T = Topics(FED)


class Device:
    """A scripted device on the memory broker that records its receipts."""

    def __init__(self, broker: MemoryBroker, ident: DeviceIdentity) -> None:
        self.ident = ident
        self.receipts: list[Receipt] = []
        self.t: MemoryTransport = broker.transport(ident.device_id)
        self.t.connect()
        self.t.subscribe(T.ack(ident.device_id), self._on_ack)

    def _on_ack(self, msg: InboundMessage) -> None:
        self.receipts.append(Receipt.from_bytes(msg.payload))

    def send(self, update: EncryptedUpdate) -> None:
        for topic, payload in update_messages(update, max_message_size=16 * 1024):
            self.t.publish(topic, payload)


def _service(
    keys: Any,
    fleet: Fleet,
    broker: MemoryBroker,
    tmp_path: Path,
    *,
    remote: bool = False,
    relay_dir: Path | None = None,
    **kw: Any,
) -> AggregatorService:
    pk, _ = keys
    committee = _support._default_committee()
    members = make_keyholders(committee, fleet)
    machine = make_machine(
        pk,
        fleet,
        dim=DIM,
        committee=committee,
        max_message_size=16 * 1024,
        **kw,
    )
    store = AggregatorStore(tmp_path / "agg.db", federation=FED, key_fingerprint=pk.fingerprint)
    transport = broker.transport(
        "aggregator",
        clean_start=False,
        session_expiry_s=3600,
        manual_ack=True,
        max_message_size=16 * 1024,
    )
    clock = iter(range(10_000, 10**9, 10))
    service = AggregatorService(
        machine,
        store,
        transport,
        keyholders=() if remote else members,
        clock_ms=lambda: next(clock),
        relay_dir=relay_dir,
    )
    service._test_members = members  # type: ignore[attr-defined]
    return service


def _retained_model(broker: MemoryBroker) -> GlobalModel:
    r = Reassembler()
    i = 0
    while (payload := broker.retained(T.model(i))) is not None:
        whole = r.add(Chunk.from_bytes(payload))
        i += 1
        if whole is not None:
            return GlobalModel.from_bytes(whole)
    raise AssertionError("no complete retained model")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(5, tmp_path / "registry.json")


def test_round_over_memory_broker(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=3)
    svc.start()
    ann = RoundAnnouncement.from_bytes(broker.retained(T.round) or b"")
    assert ann.round_id == 1
    devices = [Device(broker, fleet.identities[d]) for d in fleet.ids()[:3]]
    values = []
    for i, dev in enumerate(devices):
        upd, vals = make_update(ann, pk, dev.ident, deltas(3, DIM)[i])
        values.append(vals)
        dev.send(upd)
        svc.pump()
        assert [r.status for r in dev.receipts] == ["accepted"]
    model = _retained_model(broker)
    assert model.version == 1
    expected = (np.sum(values, axis=0) / svc.machine.plan.packing.scale / 3).astype("<f4")
    np.testing.assert_array_equal(np.frombuffer(model.weights, "<f4"), expected)
    assert RoundAnnouncement.from_bytes(broker.retained(T.round) or b"").round_id == 2
    svc.close()


def test_unacked_update_redelivered_after_crash_and_counted_once(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=3)
    svc.start()
    ann = svc.machine.announcement
    assert ann is not None
    dev = Device(broker, fleet.identities["dev00"])
    upd, _ = make_update(ann, pk, dev.ident, deltas(1, DIM)[0])
    dev.send(upd)
    # the service "dies" before processing (no commit, so no ack): the session keeps it
    broker.kick("aggregator")
    svc.store.close()
    assert broker.pending("aggregator") >= 1
    # and the broker lost its retained messages too
    broker.restart(lose_retained=True)
    svc2 = _service(keypair, fleet, broker, tmp_path, target=3)
    svc2.start()
    assert broker.retained(T.round) is not None  # re-published from the store
    svc2.pump()
    assert svc2.machine.count == 1
    dev.t.connect()
    dev.send(upd)  # the device retries too: acknowledged as duplicate
    svc2.pump()
    assert svc2.machine.count == 1 and len(svc2.store.accepted(1)) == 1
    assert dev.receipts[-1].status == "duplicate"
    svc2.close()


def test_remote_keyholder_over_topics(keypair, fleet, tmp_path) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=3, remote=True)
    members = svc._test_members  # type: ignore[attr-defined]
    for member in members:
        transport = broker.transport(member.holder_id, max_message_size=16 * 1024)
        state = tmp_path / f"{member.holder_id}.json"
        KeyholderService(member, transport, state_path=state).start()
    svc.start()
    ann = svc.machine.announcement
    assert ann is not None
    for i, d in enumerate(fleet.ids()[:3]):
        Device(broker, fleet.identities[d]).send(
            make_update(ann, pk, fleet.identities[d], deltas(3, DIM)[i])[0]
        )
        svc.pump()
    for _ in range(3):
        svc.pump()
    assert svc.machine.model is not None and svc.machine.model.version == 1
    for member in members:
        assert json.loads((tmp_path / f"{member.holder_id}.json").read_text()) == {
            "1": member.answered_rounds()[1].hex()
        }
    rec = svc.store.round_record(1)
    assert rec is not None and rec.outcome == "ok"
    results, released = round_outcome(rec.result)
    assert len(results) == 2 and all(r.status == "ok" for r in results)
    assert released is not None and released.shape == (DIM,)
    svc.close()


def test_status_cli_reports_round_and_rejections(keypair, fleet, tmp_path, capsys) -> None:
    pk, _ = keypair
    broker = MemoryBroker()
    svc = _service(keypair, fleet, broker, tmp_path, target=3)
    svc.start()
    ann = svc.machine.announcement
    assert ann is not None
    dev = Device(broker, fleet.identities["dev01"])
    dev.send(make_update(ann, pk, dev.ident, deltas(2, DIM)[1])[0])
    stranger = DeviceIdentity.generate("dev09")
    Device(broker, stranger).send(make_update(ann, pk, stranger, deltas(1, DIM)[0])[0])
    svc.pump()
    assert cli_main(["status", "--store", str(tmp_path / "agg.db"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["round"]["contributors"] == ["dev01"]
    assert data["round"]["rejections"] == {"unknown_device": 1}
    assert cli_main(["status", "--store", str(tmp_path / "agg.db")]) == 0
    assert "unknown_device=1" in capsys.readouterr().out
    svc.close()
