"""`edgefl bench aggregator --quick` runs and reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

from edge_sdk.cli import main


def test_bench_quick_reports_figures(tmp_path: Path) -> None:
    out = tmp_path / "agg.json"
    assert main(["bench", "aggregator", "--json", str(out), "--quick"]) == 0
    data = json.loads(out.read_text())
    for key in (
        "updates_per_s",
        "adds_per_s_per_core",
        "raw_mulmod_per_s",
        "speedup_2_cores",
        "round_s",
        "round_s_aggregator",
        "holders_share_s",
        "synthetic",
    ):
        assert key in data, key
    assert data["updates_per_s"] > 0 and data["raw_mulmod_per_s"] > 0
    assert set(data["targets"]) == {
        "adds_per_core_vs_raw_mulmod",
        "speedup_2_cores",
        "round_s_aggregator",
    }


def test_aggregator_init_writes_a_loadable_config(tmp_path: Path) -> None:
    from aggregator.config import load_config

    target = tmp_path / "aggregator.toml"
    assert main(["aggregator", "init", str(target)]) == 0
    cfg = load_config(target)
    assert cfg.aggregator.federation == "demo" and cfg.broker["clean_start"] is False
    assert cfg.committee.mode == "remote"  # a committee of key holders by default
    assert main(["aggregator", "init", str(target)]) == 2  # refuses to overwrite


def test_aggregator_init_from_an_onnx_model_fills_dimension_and_initial_weights(
    tmp_path: Path,
) -> None:
    import numpy as np

    from aggregator.config import load_config
    from edge_sdk.models import OnnxModel, zoo

    model_path = tmp_path / "mlp.onnx"
    model_path.write_bytes(zoo.digits_mlp(hidden=6, seed=1).SerializeToString())
    target = tmp_path / "aggregator.toml"
    assert main(["aggregator", "init", str(target), "--model", str(model_path)]) == 0
    cfg = load_config(target)
    weights = OnnxModel.from_file(model_path).get_flat()
    assert cfg.aggregator.dimension == weights.size
    initial = np.load(cfg.path(cfg.aggregator.initial_model))
    np.testing.assert_array_equal(initial, weights.astype(np.float32))
    assert np.any(initial != 0)  # the model's own weights, not zeros
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["aggregator", "init", str(tmp_path / "b.toml"), "--model", str(bad)]) == 2
