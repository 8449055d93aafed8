"""The PyTorch model zoo (examples/zoo): every family trains all its parameters like PyTorch.

Each family is exported with ``export_torch``, trained for 20 SGD steps here
and in PyTorch from the same weights on the same batches, and must agree
within 1e-4 (weights, BatchNorm running statistics, and the predictions of
the exported inference model against PyTorch in ``eval()``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

ZOO = Path(__file__).resolve().parent.parent / "examples" / "zoo"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"edgefl_zoo_{name}", ZOO / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


families = _load("families")
TOLERANCE = 1e-4


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_family_trains_every_parameter_like_pytorch(name: str) -> None:
    result = families.parity(name)
    assert result.all_trainable, result
    assert result.steps == 20
    assert result.max_abs_weights <= TOLERANCE, result
    assert result.max_abs_running_stats <= TOLERANCE, result
    assert result.max_abs_predictions <= TOLERANCE, result


@pytest.mark.parametrize("name", ["mlp", "attention", "cnn_bn", "gru", "lstm", "depthwise"])
def test_family_at_opset_20_with_momentum(name: str) -> None:
    result = families.parity(name, momentum=0.9, opset=20)
    assert result.all_trainable and result.max_abs <= TOLERANCE, result


def test_export_script_writes_every_family(tmp_path: Path) -> None:
    export = _load("export_zoo")
    written = export.main(["--out", str(tmp_path)])
    assert sorted(p.stem for p in written) == sorted(families.FAMILIES)
    from edge_sdk.models import OnnxModel

    for path in written:
        model: Any = OnnxModel.from_file(path, loss=families.FAMILIES[path.stem].loss)
        assert model.parameter_counts()["frozen"] == 0
