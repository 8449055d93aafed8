"""The per-family figures of ``edgefl bench training`` (two families, quick mode)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def test_family_figures_have_speed_memory_parity_and_misses() -> None:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "training.py"
    spec = importlib.util.spec_from_file_location("edgefl_bench_training_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    figures = module._family_figures(torch, True, only=["logistic", "cnn_bn"])
    assert sorted(figures) == ["cnn_bn", "logistic"]
    for name, entry in figures.items():
        assert entry["parity_max_abs"] <= 1e-4, name
        assert entry["speedup_vs_torch"] > 0 and entry["peak_rss_mb"] > 0, name
        assert isinstance(entry["misses"], list), name
        for miss in entry["misses"]:  # a missed target always says why
            assert miss and ("speed-up" in miss or "RSS" in miss), miss
