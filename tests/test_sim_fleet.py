"""The full-stack fleet over real brokers, with faults, and the demo command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.privacy import PrivacyLedger
from firmware_sim.broker import MosquittoBroker
from firmware_sim.fleet import DeviceProfile, Fleet, FleetConfig

pytestmark = pytest.mark.broker


def _small(broker_url: str, **kw: object) -> FleetConfig:
    base: dict[str, object] = dict(
        devices=5,
        rounds=2,
        model="softmax",
        clip=0.5,
        lr=0.3,
        local_epochs=2,
        round_duration_s=20,
        broker=broker_url,
        epsilon=4.0,
    )
    base.update(kw)
    return FleetConfig(**base)  # type: ignore[arg-type]


def _ledgers(workdir: Path) -> list[PrivacyLedger]:
    return [
        PrivacyLedger.open_existing(p) for p in sorted((workdir / "devices").glob("*/ledger.json"))
    ]


def test_five_devices_complete_rounds_on_each_broker(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = _small(broker.url if broker.supports_mqtt5 else "embedded")
    result = Fleet(cfg, tmp_path / "w").run(timeout_s=120)
    assert [r.round for r in result.rounds] == [1, 2]
    assert all(r.contributors == 5 for r in result.rounds)
    assert result.rejections == {}
    for ledger in _ledgers(tmp_path / "w"):
        assert len(ledger.entries) == 2 and ledger.spent() <= 4.0


@pytest.mark.slow
def test_rounds_close_at_quorum_with_dropouts_and_reboots(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    profile = DeviceProfile(availability=0.8, reboot_prob=0.3, slowdown=1.5)
    cfg = _small(
        mosquitto.url,
        devices=8,
        rounds=3,
        min_clients=4,
        profile=profile,
        seed=5,
        round_duration_s=8,
    )
    result = Fleet(cfg, tmp_path / "w").run(timeout_s=180)
    assert len(result.rounds) == 3
    assert all(r.contributors >= 4 for r in result.rounds)
    assert result.reboots >= 1, "the profile should have rebooted someone"
    for ledger in _ledgers(tmp_path / "w"):
        assert ledger.spent() <= 4.0  # no device exceeds its budget
        rounds = [e.round_id for e in ledger.entries]
        assert len(rounds) == len(set(rounds))  # never charged twice for a round


def test_demo_writes_its_report(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    report = tmp_path / "demo-report"
    code = main(
        [
            "demo",
            "--devices",
            "4",
            "--rounds",
            "2",
            "--broker",
            mosquitto.url,
            "--report",
            str(report),
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    for key in (
        "final_accuracy",
        "central_accuracy",
        "epsilon",
        "delta",
        "bytes_per_param",
        "rounds",
        "broker",
        "devices",
        "keyholders",
    ):
        assert key in summary, key
    assert summary["rounds"] == 2 and 0 < summary["epsilon"] <= 8.0
    assert summary["devices"] == 4 and summary["keyholders"] == {"n": 3, "t": 2}
    assert summary["bytes_per_param"] < 6.6
    assert (report / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "s.json").read_text()) == summary


def test_sim_cli_runs_the_full_stack_over_a_broker(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    out = tmp_path / "s.json"
    code = main(
        [
            "sim",
            "run",
            "--broker",
            mosquitto.url,
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
    assert (tmp_path / "w" / "aggregator.db").exists()
    # the direct engine's crypto-off shortcut makes no sense over a broker
    assert main(["sim", "run", "--broker", mosquitto.url, "--crypto", "off"]) == 2
