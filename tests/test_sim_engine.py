"""The direct fleet simulator: it drives the real round machine, key holder and device code."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator import optimizers
from aggregator import rounds as rounds_module
from aggregator.keyholder import KeyHolder
from aggregator.rounds import RoundMachine
from edge_sdk.cli import main
from firmware_sim import engine
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
    on = run(SimConfig(**base, crypto=True), insecure_seed=5)  # type: ignore[arg-type]
    off = run(SimConfig(**base, crypto=False), insecure_seed=5)  # type: ignore[arg-type]
    assert (on.crypto, off.crypto) == ("paillier", "unblinded")
    assert on.randomness == off.randomness == "seeded-insecure"
    assert len(on.sums) == len(off.sums) == 2
    for a, b in zip(on.sums, off.sums, strict=True):
        assert a.dtype == np.int64 and np.array_equal(a, b)
    assert [r.accuracy for r in on.rounds] == [r.accuracy for r in off.rounds]
    assert on.rounds[0].bytes_up == off.rounds[0].bytes_up


def test_noise_is_os_csprng_unless_the_seeded_seam_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = SimConfig(devices=5, rounds=2, setting="dp", seed=1)
    a, b = run(cfg, insecure_seed=9), run(cfg, insecure_seed=9)
    c = run(cfg, insecure_seed=10)
    assert all(np.array_equal(x, y) for x, y in zip(a.sums, b.sums, strict=True))
    assert not np.array_equal(a.sums[0], c.sums[0])
    assert a.to_json()["randomness"] == "seeded-insecure"

    def no_seeded_source(*_args: Any) -> None:
        raise AssertionError("a seeded source was used without the test seam")

    monkeypatch.setattr(engine, "DeterministicRandom", no_seeded_source)
    d, e = run(cfg), run(cfg)
    assert d.randomness == "os-csprng" and d.to_json()["randomness"] == "os-csprng"
    assert not np.array_equal(d.sums[0], e.sums[0])  # fresh noise every run


def test_he_only_matches_float_fedavg_closely() -> None:
    fl = run(SimConfig(devices=10, rounds=5, setting="float"))
    he = run(SimConfig(devices=10, rounds=5, setting="he"))
    assert abs(fl.final_accuracy - he.final_accuracy) <= 0.01
    assert he.rounds[-1].epsilon == 0.0
    assert sum(r.clipped for r in fl.rounds) == 0  # the float baseline's clip never binds


def test_privacy_spend_is_the_ledgers_and_reaches_the_target_not_beyond() -> None:
    r = run(SimConfig(devices=8, rounds=4, setting="dp", epsilon=2.0))
    eps = [x.epsilon for x in r.rounds]
    assert eps == sorted(eps) and eps[-1] <= 2.0 + 1e-9 and eps[-1] > 1.5
    assert all(x.outcome == "ok" and x.contributors == 8 for x in r.rounds)


def test_dropouts_reduce_contributors_and_arrive_late() -> None:
    r = run(SimConfig(devices=30, rounds=3, setting="he", dropout=0.5, seed=4))
    counts = [x.contributors for x in r.rounds]
    assert all(0 < c < 30 for c in counts)
    assert all(x.outcome == "ok" for x in r.rounds)  # default quorum: half the expected
    assert sum(x.late for x in r.rounds) == r.stats["late"] > 0


def test_a_round_below_quorum_fails_as_in_the_service_and_is_never_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures: list[str] = []
    real_fail = RoundMachine._fail

    def spy_fail(self: RoundMachine, reason: str, now: int, result: bytes = b"") -> Any:
        failures.append(reason)
        return real_fail(self, reason, now, result)

    applied: list[int] = []
    real_mean = optimizers.mean_delta  # what aggregator.rounds calls

    def spy_mean(ints: Any, **kw: Any) -> Any:
        applied.append(int(kw["count"]))
        return real_mean(ints, **kw)

    monkeypatch.setattr(RoundMachine, "_fail", spy_fail)
    monkeypatch.setattr(rounds_module, "mean_delta", spy_mean)
    cfg = SimConfig(devices=18, rounds=6, setting="dp", min_clients=18, dropout=0.1, seed=3)
    r = run(cfg)
    failed = [x for x in r.rounds if x.outcome != "ok"]
    ok = [x for x in r.rounds if x.outcome == "ok"]
    assert len(r.rounds) == 6 and failed and ok
    assert all(x.outcome == "failed: quorum" and x.contributors < 18 for x in failed)
    assert all(x.contributors == 18 and x.late == 0 for x in ok)
    assert failures == ["quorum"] * len(failed)  # the machine's own decision
    assert r.stats["rounds_failed_quorum"] == len(failed)
    assert applied == [18] * len(ok) and len(r.sums) == len(ok)  # only full sums applied
    for before, after in zip(r.rounds, r.rounds[1:], strict=False):
        if after.outcome != "ok":
            assert after.accuracy == before.accuracy  # a failed round leaves the model
    # Every device that prepared an update was charged, applied or not: the
    # figure is the largest charge of any ledger, within the budget.
    assert 0 < r.rounds[-1].epsilon <= cfg.epsilon + 1e-9
    assert r.rounds[0].epsilon < r.rounds[-1].epsilon


def test_the_engine_has_no_round_logic_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = ast.parse(Path(engine.__file__).read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    round_logic = {
        "mean_delta",
        "step",
        "sum_ciphertexts",
        "decrypt",
        "unpack_sum",
        "epsilon_spent",
    }
    assert not used & round_logic, used & round_logic
    assert {"RoundMachine", "InMemoryCommittee", "DeviceSession", "build_update"} <= used
    # Behaviour: the round machine's mean decides the model ...
    monkeypatch.setattr(rounds_module, "mean_delta", lambda ints, **kw: np.zeros(len(ints)))
    frozen = run(SimConfig(devices=6, rounds=3, setting="he"))
    assert len({x.accuracy for x in frozen.rounds}) == 1
    assert all(x.outcome == "ok" for x in frozen.rounds)
    monkeypatch.undo()

    # ... and the key holder decides whether there is a sum at all.
    def refuse(self: KeyHolder, request: Any, **kw: Any) -> Any:
        return self._result(request, "refused", "test", 0)

    monkeypatch.setattr(KeyHolder, "handle", refuse)
    refused = run(SimConfig(devices=6, rounds=2, setting="he"))
    assert [x.outcome for x in refused.rounds] == ["failed: refused:test"] * 2
    assert refused.sums == [] and any("keyholder_refused" in a for a in refused.alerts)


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
    assert (summary["randomness"], summary["crypto"]) == ("os-csprng", "unblinded")
    assert [r["outcome"] for r in summary["rounds"]] == ["ok", "ok"]
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_sim_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "run", "--devices", "0"]) == 2
    assert "devices" in capsys.readouterr().err
