"""``edgefl privacy`` and ``edgefl bench privacy``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.privacy import (
    DPPolicy,
    NoiseSpec,
    PrivacyLedger,
    calibrate,
    cost_of,
    epsilon_spent,
)

CAL_ARGS = [
    "privacy",
    "calibrate",
    "--epsilon",
    "2",
    "--delta",
    "1e-6",
    "--rounds",
    "50",
    "--mode",
    "distributed",
    "--clip",
    "1",
    "--scale",
    "128",
    "--dimension",
    "1000",
    "--min-clients",
    "20",
]


def test_calibrate_json_gives_a_spec_that_meets_the_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*CAL_ARGS, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    spec = NoiseSpec.from_dict(data["noise_spec"])
    assert spec.min_clients == 20 and spec.delta == 1e-6
    assert data["report"]["central_epsilon"] == pytest.approx(epsilon_spent(spec, 50))
    assert data["report"]["central_epsilon"] <= 2.0


def test_calibrate_text_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(CAL_ARGS) == 0
    assert "per-device sigma" in capsys.readouterr().out
    bad = [a if a != "1e-6" else "2.0" for a in CAL_ARGS]  # delta out of range
    assert main(bad) == 2


def _ledger_with_rounds(path: Path, rounds: int) -> PrivacyLedger:
    pol = DPPolicy(mode="distributed", epsilon=3.0, delta=1e-5, rounds=10, clip=1.0, min_clients=10)
    spec = calibrate(pol, scale=64.0, dimension=100)
    led = PrivacyLedger(path, 3.0, 1e-5)
    for r in range(rounds):
        led.record(f"f/{r}", cost_of(spec), idempotency_key=str(r), noise=spec.to_dict())
    return led


def test_report_prints_spend_and_pld(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    led = _ledger_with_rounds(tmp_path / "l.json", 4)
    assert main(["privacy", "report", "--ledger", str(tmp_path / "l.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rounds"] == 4
    assert data["central_epsilon"] == pytest.approx(led.spent())
    assert data["remaining_epsilon"] == pytest.approx(3.0 - led.spent())
    assert data["local_epsilon"] > data["central_epsilon"]
    pytest.importorskip("dp_accounting")
    assert data["pld_epsilon"] is not None and data["pld_epsilon"] <= data["central_epsilon"]
    assert main(["privacy", "report", "--ledger", str(tmp_path / "l.json")]) == 0
    assert "spent (central)" in capsys.readouterr().out


def test_report_on_corrupted_or_missing_ledger(tmp_path: Path) -> None:
    _ledger_with_rounds(tmp_path / "l.json", 1)
    (tmp_path / "l.json").write_text("{}")
    assert main(["privacy", "report", "--ledger", str(tmp_path / "l.json")]) == 1
    assert main(["privacy", "report", "--ledger", str(tmp_path / "none.json")]) == 2


def test_bench_privacy_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "privacy", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for sigma in (1, 10, 1000):
        assert data[f"samples_per_s_sigma_{sigma}"] > 0
        assert f"noise_100k_sigma_{sigma}" in data["targets"]


def test_report_gives_no_pld_figure_that_leaves_out_extra_slots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A round that also sends a noised clipped-or-not bit costs more than its model noise."""
    from fractions import Fraction

    from edge_sdk.extras import clip_slot
    from edge_sdk.privacy.accounting import round_cost

    pol = DPPolicy(mode="distributed", epsilon=3.0, delta=1e-5, rounds=10, clip=1.0, min_clients=10)
    spec = calibrate(pol, scale=64.0, dimension=100)
    slots = (clip_slot(Fraction(400)),)
    led = PrivacyLedger(tmp_path / "l.json", 3.0, 1e-5)
    for r in range(3):
        cost = round_cost(spec, slots)
        led.record(f"f/{r}", cost, idempotency_key=str(r), noise=spec.to_dict())
    assert main(["privacy", "report", "--ledger", str(tmp_path / "l.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["entries_with_extra_slots"] == 3
    assert data["pld_epsilon"] is None and "extra slots" in data["pld_note"]
    assert data["central_epsilon"] == pytest.approx(led.spent())
    assert data["central_epsilon"] > _ledger_with_rounds(tmp_path / "m.json", 3).spent()
