"""The direct fleet simulator: determinism, crypto on/off identity, partitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.cli import main
from firmware_sim.datasets import load_dataset, sensor_maintenance
from firmware_sim.engine import SimConfig, central_baseline, run
from firmware_sim.partition import dirichlet, iid, partition, quantity_skew


def test_crypto_on_and_off_give_bit_identical_aggregates() -> None:
    base = dict(
        dataset="breast_cancer",
        model="logistic",
        devices=6,
        rounds=2,
        setting="dp",
        epsilon=4.0,
        seed=3,
    )
    on = run(SimConfig(**base, crypto=True))  # type: ignore[arg-type]
    off = run(SimConfig(**base, crypto=False))  # type: ignore[arg-type]
    assert len(on.sums) == len(off.sums) == 2
    for a, b in zip(on.sums, off.sums, strict=True):
        assert a.dtype == np.int64 and np.array_equal(a, b)
    assert [r.accuracy for r in on.rounds] == [r.accuracy for r in off.rounds]
    assert on.rounds[0].bytes_up == off.rounds[0].bytes_up


def test_runs_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    cfg = SimConfig(devices=5, rounds=2, setting="dp", seed=1)
    a, b = run(cfg), run(cfg)
    c = run(SimConfig(devices=5, rounds=2, setting="dp", seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a.sums, b.sums, strict=True))
    assert not np.array_equal(a.sums[0], c.sums[0])


def test_he_only_matches_float_fedavg_closely() -> None:
    fl = run(SimConfig(devices=10, rounds=5, setting="float"))
    he = run(SimConfig(devices=10, rounds=5, setting="he"))
    assert abs(fl.final_accuracy - he.final_accuracy) <= 0.01
    assert he.rounds[-1].epsilon == 0.0


def test_privacy_spend_reaches_the_target_and_not_beyond() -> None:
    r = run(SimConfig(devices=8, rounds=4, setting="dp", epsilon=2.0))
    eps = [x.epsilon for x in r.rounds]
    assert eps == sorted(eps) and eps[-1] <= 2.0 + 1e-9 and eps[-1] > 1.5


def test_dropouts_reduce_contributors() -> None:
    r = run(SimConfig(devices=30, rounds=3, setting="he", dropout=0.5, seed=4))
    counts = [x.contributors for x in r.rounds]
    assert all(0 < c < 30 for c in counts)


def test_partitions_cover_every_example_once() -> None:
    labels = np.repeat(np.arange(5), 40)
    for parts in (iid(200, 7), quantity_skew(200, 7), dirichlet(labels, 7, alpha=0.1)):
        merged = np.sort(np.concatenate(parts))
        assert np.array_equal(merged, np.arange(200))
        assert min(len(p) for p in parts) >= 1
    skewed = dirichlet(labels, 5, alpha=0.05, seed=1)
    classes_per_device = [len(np.unique(labels[p])) for p in skewed]
    assert min(classes_per_device) < 5  # label skew, not IID
    with pytest.raises(ValueError, match="unknown partition"):
        partition(labels, 3, scheme="round-robin")
    with pytest.raises(ValueError, match="cannot give"):
        iid(3, 5)


def test_datasets_load_and_are_standardised() -> None:
    d = load_dataset("digits")
    assert d.n_features == 64 and d.n_classes == 10
    assert abs(float(d.x_train.mean())) < 0.05
    x, y = sensor_maintenance(n=2000, seed=1)
    assert x.shape == (2000, 24) and 0.25 < y.mean() < 0.35
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")


def test_central_baseline_beats_chance() -> None:
    assert central_baseline(SimConfig(rounds=3)) > 0.8


def test_sim_cli_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    code = main(
        [
            "sim",
            "run",
            "--devices",
            "4",
            "--rounds",
            "2",
            "--dataset",
            "breast_cancer",
            "--model",
            "logistic",
            "--report",
            str(out),
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert len(summary["rounds"]) == 2 and 0 <= summary["final_accuracy"] <= 1
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_sim_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "run", "--devices", "0"]) == 2
    assert "devices" in capsys.readouterr().err
