"""`edgefl bench scale --quick`: rounds through Mosquitto, every receipt and the sum checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sdk.cli import main

pytestmark = pytest.mark.broker


@pytest.mark.timeout(480)
def test_bench_scale_quick_completes_rounds_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"

    assert main(["bench", "scale", "--json", str(out), "--quick"]) == 0

    data = json.loads(out.read_text())
    for key in (
        "fsync_per_update_updates_per_s",
        "updates_per_s_1_worker",
        "updates_per_s_2_workers",
        "round_10000_s",
        "lost",
        "double_counted",
        "group_commit_vs_one_commit",
        "components",
        "synthetic",
    ):
        assert key in data, key
    assert data["lost"] == 0 and data["double_counted"] == 0
    scenarios = data["scenarios"]
    assert set(scenarios) == {
        "one_commit_per_update",
        "group_commit",
        "group_commit_2_workers",
        "large",
        "large_2_workers",
    }
    for name, sc in scenarios.items():
        assert "error" not in sc, (name, sc)
        assert sc["round_done"] and sc["sum_exact"], (name, sc)
        assert sc["receipts"] == sc["devices"] == sc["accepted_rows"], (name, sc)
        assert sc["bad_receipts"] == 0, (name, sc)
    # one transaction per update in the baseline; the service reports what it committed
    base = scenarios["one_commit_per_update"]
    assert base["accept_transactions"] == base["devices"]
    assert 1 <= scenarios["group_commit"]["accept_transactions"] <= base["devices"]
    assert data["fsync_per_update_updates_per_s"] > 0 and data["updates_per_s_1_worker"] > 0
    assert data["updates_per_s_2_workers"] > 0 and data["two_workers_vs_one"] is not None
    assert scenarios["large_2_workers"]["workers"] == 2
    assert set(data["targets"]) == {
        "group_commit_vs_one_commit",
        "two_workers_vs_one",
        "round_10000_s",
        "lost_and_double_counted",
    }
