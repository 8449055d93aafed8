"""``edgefl model inspect``: counts, operators, shapes, trainability, dimension."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import helper

from edge_sdk.cli import main
from edge_sdk.models import OnnxModel, zoo
from edge_sdk.models.inspection import inspect_model


def _blocked(tmp_path: Path) -> Path:
    model = zoo.mlp(4, 3, 2)
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Cos"
            node.name = "my_cos"
    path = tmp_path / "blocked.onnx"
    onnx.save_model(model, str(path))
    return path


def test_inspect_reports_a_trainable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(zoo.mlp(4, 3, 2), str(path))
    code = main(["model", "inspect", str(path), "--json"], only=["model"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["will_train"] is True
    assert info["dimension"] == OnnxModel(zoo.mlp(4, 3, 2)).layout.size == 23
    assert info["parameters"]["trainable"]["values"] == 23
    assert info["parameters"]["frozen"]["tensors"] == 0
    assert info["operators"] == {"Gemm": 2, "Relu": 1}
    assert info["inputs"] == [{"name": "input", "dtype": "float", "shape": ["N", 4]}]
    assert info["outputs"][0]["shape"] == ["N", 2]
    code = main(["model", "inspect", str(path)], only=["model"])
    text = capsys.readouterr().out
    assert "dimension: 23" in text and "will train: yes" in text


def test_inspect_explains_why_a_model_will_not_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _blocked(tmp_path)
    code = main(["model", "inspect", str(path)], only=["model"])
    text = capsys.readouterr().out
    assert code == 1
    assert "will train: NO" in text and "my_cos" in text and "fc1.weight" in text
    info = inspect_model(path)
    assert info["will_train"] is False and info["dimension"] is None
    assert set(info["blocked"]) == {"fc1.weight", "fc1.bias"}
    assert info["parameters"]["trainable"]["names"] == ["fc2.weight", "fc2.bias"]
    assert "Cos" in info["unsupported_operators"]
    frozen = inspect_model(path, frozen=["fc1.*"])
    assert frozen["will_train"] is True and frozen["dimension"] == 8


def test_inspect_accepts_a_loaded_model() -> None:
    model = zoo.mlp(4, 3, 2)
    model.graph.node.append(helper.make_node("Identity", ["logits"], ["copy"]))
    info = inspect_model(model, loss="mse")
    assert info["file"] == "<model>" and info["will_train"] is True


def test_inspect_warns_about_single_value_initializers_without_export_metadata() -> None:
    import numpy as np
    from onnx import numpy_helper

    model = zoo.mlp(4, 3, 2)
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
    model.graph.node.append(helper.make_node("Mul", ["logits", "scale"], ["scaled"]))
    model.graph.output[0].name = "scaled"
    info = inspect_model(model)
    assert info["will_train"] is True
    assert any("scale" in w and "constants=" in w for w in info["warnings"])
    assert inspect_model(model, constants=["scale"])["warnings"] == []
