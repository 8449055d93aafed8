"""The utility study: JSON structure, honest selection (val only), target checks."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from edge_sdk.cli import main
from firmware_sim import study
from firmware_sim.engine import SimConfig, SimResult
from firmware_sim.study import (
    Row,
    _Candidate,
    _pick,
    format_table,
    quick_plan,
    target_checks,
)

SETTINGS = {"central", "float", "he", "he_float_config", "dp"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[SimConfig]]:
    """One quick study through the CLI, with every engine call recorded."""
    calls: list[SimConfig] = []
    real_run = study.run  # type: ignore[attr-defined]

    def spy(config: SimConfig, **kwargs: Any) -> SimResult:
        calls.append(config)
        return real_run(config, **kwargs)

    out = tmp_path_factory.mktemp("utility") / "utility.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "run", spy)
        assert main(["bench", "utility", "--quick", "--json", str(out)]) == 0
    data: dict[str, Any] = json.loads(out.read_text())
    return data, calls


@pytest.fixture(scope="module")
def quick_json(quick_run: tuple[dict[str, Any], list[SimConfig]]) -> dict[str, Any]:
    return quick_run[0]


def test_quick_bench_has_one_row_per_fleet_and_setting(quick_json: dict[str, Any]) -> None:
    plan = quick_plan()
    rows = quick_json["rows"]
    for fleet in plan.fleets:
        settings = [
            (r["setting"], r["epsilon_target"])
            for r in rows
            if (r["dataset"], r["devices"]) == (fleet.dataset, fleet.devices)
        ]
        assert {s for s, _ in settings} >= SETTINGS
        dp_targets = sorted(e for s, e in settings if s == "dp")
        assert dp_targets == sorted(plan.epsilons)
        assert len(settings) == len(set(settings))
        eps = fleet.strategies_epsilon
        if eps is None:
            assert not any("fed" in s for s, _ in settings)
            continue
        for name in ("fedprox", "fedyogi", "fedadagrad"):
            assert (f"float_{name}", None) in settings and (f"dp_{name}", eps) in settings
    assert quick_json["meta"]["quick"] is True


def test_quick_bench_rows_are_sane(quick_json: dict[str, Any]) -> None:
    plan = quick_plan()
    seeds = {(f.dataset, f.devices): len(f.test_seeds) for f in plan.fleets}
    for row in quick_json["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert len(row["test_accuracies"]) == seeds[(row["dataset"], row["devices"])]
        mean = sum(row["test_accuracies"]) / len(row["test_accuracies"])
        assert row["accuracy"] == pytest.approx(mean, abs=1e-4)
        assert row["seconds"] >= 0 and row["candidates"] >= 1
        if row["setting"].startswith("dp"):
            assert 0.0 < row["epsilon"] <= row["epsilon_target"] + 1e-9
            assert row["delta"] == plan.delta
            assert {"rounds", "clip", "server_opt", "server_lr", "min_clients"} <= set(
                row["params"]
            )
        else:
            assert row["epsilon"] is None and row["epsilon_target"] is None
        if row["setting"] == "dp":
            assert row["params"]["min_clients"] == row["devices"]
        if row["setting"] == "dp_default_quorum":
            assert row["params"]["min_clients"] == row["devices"] // 2


def test_quick_bench_reports_targets_and_round_timing(quick_json: dict[str, Any]) -> None:
    targets = quick_json["targets"]
    for fleet in quick_plan().fleets:
        name = f"{fleet.dataset}_{fleet.devices}"
        for key in (f"he_vs_float_{name}", f"float_vs_central_{name}"):
            assert isinstance(targets[key]["met"], bool) and math.isfinite(targets[key]["value"])
    timing = quick_json["round_timing"]
    assert timing["devices"] == max(f.devices for f in quick_plan().fleets)
    assert timing["float_round_seconds"] > 0


def test_test_split_is_used_only_for_the_chosen_configurations(
    quick_run: tuple[dict[str, Any], list[SimConfig]],
) -> None:
    result, calls = quick_run
    plan = quick_plan()
    all_test_calls = [c for c in calls if c.eval_split == "test"]
    # federated-evaluation runs re-run a chosen configuration on a test seed
    evaluation_calls = [c for c in all_test_calls if c.evaluate_every]
    test_calls = [c for c in all_test_calls if not c.evaluate_every]
    simulated_rows = [r for r in result["rows"] if r["setting"] != "central"]
    seeds = {(f.dataset, f.devices): f.test_seeds for f in plan.fleets}
    assert len(test_calls) == sum(len(seeds[(r["dataset"], r["devices"])]) for r in simulated_rows)
    for row in simulated_rows:
        p = row["params"]
        quorum = None if row["setting"] == "dp_default_quorum" else row["devices"]
        setting = "dp_adaptive" if row["setting"] == "dp_adaptive" else row["setting"].split("_")[0]
        mine = {
            c.seed
            for c in test_calls
            if (c.dataset, c.devices, c.setting) == (row["dataset"], row["devices"], setting)
            and (c.rounds, c.server_opt, c.server_lr)
            == (p["rounds"], p["server_opt"], p["server_lr"])
            and (setting.startswith("float") or setting == "dp_adaptive" or c.clip == p["clip"])
            and (
                not setting.startswith("dp")
                or (c.epsilon, c.min_clients) == (row["epsilon_target"], quorum)
            )
            and c.prox_mu == p.get("prox_mu", 0.0)
        }
        assert mine == set(seeds[(row["dataset"], row["devices"])]), row
    assert evaluation_calls and len(result["federated_evaluation"]) <= len(evaluation_calls)
    for c in evaluation_calls:
        assert c.seed in seeds[(c.dataset, c.devices)]
        assert any(
            (r["dataset"], r["devices"], r["setting"]) == (c.dataset, c.devices, c.setting)
            and r["params"]["rounds"] == c.rounds
            and (r["params"]["server_opt"], r["params"]["server_lr"]) == (c.server_opt, c.server_lr)
            for r in simulated_rows
        ), c
    # Tuning seeds and test seeds never overlap.
    tuning_seeds = {c.seed for c in calls if c.eval_split == "val"}
    assert tuning_seeds.isdisjoint({c.seed for c in test_calls})


def _cand(val: float, rounds: int, order: int) -> _Candidate:
    return _Candidate(SimConfig(rounds=rounds), val, order)


def test_pick_prefers_best_validation_then_fewer_rounds_then_grid_order() -> None:
    best = _pick([_cand(0.8, 3, 0), _cand(0.9, 10, 1), _cand(0.9, 5, 2), _cand(0.9, 5, 3)])
    assert (best.val, best.config.rounds, best.order) == (0.9, 5, 2)


def test_pick_skips_failed_candidates_and_refuses_when_all_failed() -> None:
    assert _pick([_cand(-math.inf, 1, 0), _cand(0.5, 9, 1)]).order == 1
    with pytest.raises(RuntimeError):
        _pick([_cand(-math.inf, 1, 0), _cand(math.nan, 2, 1)])


def _row(setting: str, acc: float, devices: int = 50, eps: float | None = None) -> Row:
    return Row(
        dataset="digits",
        devices=devices,
        setting=setting,
        model="softmax",
        accuracy=acc,
        accuracy_std=0.0,
        test_accuracies=(acc,),
        val_accuracy=acc,
        epsilon=eps,
        epsilon_target=eps,
        delta=None if eps is None else 1e-5,
    )


def test_target_checks_compare_mean_test_accuracy_in_points() -> None:
    rows = [
        _row("central", 0.96),
        _row("float", 0.92),
        _row("he", 0.916),
        _row("dp", 0.88, eps=8.0),
    ]
    checks = target_checks(rows)
    assert checks["float_vs_central_digits_50"]["value"] == pytest.approx(-4.0)
    assert checks["float_vs_central_digits_50"]["met"] is False
    assert checks["he_vs_float_digits_50"]["value"] == pytest.approx(-0.4)
    assert checks["he_vs_float_digits_50"]["met"] is True
    assert checks["dp_eps8_vs_float_digits_50"]["value"] == pytest.approx(-4.0)
    assert checks["dp_eps8_vs_float_digits_50"]["met"] is True
    worse = target_checks([*rows[:3], replace(rows[3], accuracy=0.86)])
    assert worse["dp_eps8_vs_float_digits_50"]["met"] is False


def test_format_table_has_a_line_per_row(quick_json: dict[str, Any]) -> None:
    table = format_table(quick_json["rows"]).splitlines()
    assert len(table) == 2 + len(quick_json["rows"])
    first = quick_json["rows"][0]
    assert f"{100 * first['accuracy']:.2f}" in table[2] and first["setting"] in table[2]


def test_strategy_rows_tune_only_their_own_knob(quick_json: dict[str, Any]) -> None:
    rows = {(r["dataset"], r["devices"], r["setting"]): r for r in quick_json["rows"]}
    for (ds, n, setting), row in rows.items():
        if not setting.endswith(("_fedprox", "_fedyogi", "_fedadagrad")):
            continue
        p = row["params"]
        base = rows[(ds, n, "float")]["params"]
        assert (p["local_epochs"], p["lr"]) == (base["local_epochs"], base["lr"])
        if setting.endswith("_fedprox"):
            assert p["prox_mu"] > 0
        else:
            assert p["server_opt"] == setting.split("_")[1] and "prox_mu" not in p
        if setting.startswith("dp_"):
            dp = next(
                r
                for r in quick_json["rows"]
                if (r["dataset"], r["devices"], r["setting"], r["epsilon_target"])
                == (ds, n, "dp", row["epsilon_target"])
            )
            assert p["clip"] == dp["params"]["clip"]
