"""Smoke test of ``edgefl bench training --quick`` (figures present and sane)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_training_benchmark_quick_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sdk.cli", "bench", "training", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert figures["onnx_step_ms"] > 0
    assert figures["onnx_cnn_step_ms"] > 0
    assert figures["rss_round_parameters"] == 50_890
    assert figures["baseline_rss_mb"] < figures["peak_rss_mb"]
    if figures["torch_step_ms"] is None:
        assert figures["onnx_vs_torch_speedup"] is None
    else:
        ratio = figures["torch_step_ms"] / figures["onnx_step_ms"]
        assert figures["onnx_vs_torch_speedup"] == pytest.approx(ratio, rel=0.01)
    assert figures["targets"]["peak_rss_mb"]["met"] == (figures["peak_rss_mb"] <= 120)
