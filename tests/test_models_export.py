"""``export_torch``: training-mode export, untied weights, metadata, inline data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edge_sdk.errors import ModelError
from edge_sdk.models import OnnxModel, TrainConfig, export_torch
from edge_sdk.models.onnx_autodiff import FROZEN_METADATA_KEY, TRAINABLE_METADATA_KEY

torch = pytest.importorskip("torch")


def _meta(model: onnx.ModelProto) -> dict[str, Any]:
    return {p.key: p.value for p in model.metadata_props}


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    )


def test_export_writes_an_inline_model_with_the_parameter_list(tmp_path: Path) -> None:
    net = _mlp().eval()
    path = tmp_path / "mlp.onnx"
    proto = export_torch(net, torch.zeros(2, 6), path, opset=17)
    assert not net.training  # modes restored
    assert path.stat().st_size > 0 and list(tmp_path.iterdir()) == [path]
    loaded = onnx.load(str(path))
    assert json.loads(_meta(loaded)[TRAINABLE_METADATA_KEY]) == [
        n for n, _ in net.named_parameters()
    ]
    assert loaded.opset_import[0].version == 17
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in loaded.graph.initializer)
    dropout = [n for n in proto.graph.node if n.op_type == "Dropout"]
    assert dropout and all(len(n.input) <= 2 for n in dropout)  # identity on the device
    model = OnnxModel.from_file(path)
    assert model.roles["trainable"] == tuple(n for n, _ in net.named_parameters())
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    y = np.arange(32) % 3
    model.fit(x, y, config=TrainConfig(epochs=1, batch_size=8, lr=0.1), seed=0)


def test_export_keeps_scalar_constants_out_of_the_parameters() -> None:
    class Scaled(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: Any) -> Any:
            return self.fc(x) / 4.0**0.5

    proto = export_torch(Scaled(), torch.zeros(2, 4))
    model = OnnxModel(proto)
    assert model.roles["trainable"] == ("fc.weight", "fc.bias")
    assert all(name.startswith("fc.") for name in model.roles["trainable"])


def test_two_fresh_batchnorms_are_not_deduplicated() -> None:
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
    proto = export_torch(net, torch.zeros(3, 4))
    names = {t.name for t in proto.graph.initializer}
    assert {"0.weight", "0.bias", "1.weight", "1.bias"} <= names
    bn = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn) == 2 and bn[0].input[1] != bn[1].input[1]


def test_trainable_selects_parameters_and_records_the_rest_as_frozen() -> None:
    proto = export_torch(_mlp(), torch.zeros(2, 6), trainable=["3.*"])
    meta = _meta(proto)
    assert json.loads(meta[TRAINABLE_METADATA_KEY]) == ["3.weight", "3.bias"]
    assert json.loads(meta[FROZEN_METADATA_KEY]) == ["0.weight", "0.bias"]
    model = OnnxModel(proto)
    assert model.roles["frozen"] == ("0.weight", "0.bias")
    with pytest.raises(ModelError, match="nope"):
        export_torch(_mlp(), torch.zeros(2, 6), trainable=["nope"])
    with pytest.raises(ValueError, match="opset"):
        export_torch(_mlp(), torch.zeros(2, 6), opset=13)


def test_a_gru_exported_through_the_helper_is_rejected_not_half_trained() -> None:
    class Gru(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.GRU(3, 4, batch_first=True)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: Any) -> Any:
            return self.fc(self.rnn(x)[1][-1])

    proto = export_torch(Gru(), torch.zeros(2, 5, 3))
    try:
        model = OnnxModel(proto)
    except ModelError as exc:
        assert "rnn.weight_ih_l0" in str(exc)
    else:  # GRU is supported: then every parameter trains
        assert set(model.roles["trainable"]) == {n for n, _ in Gru().named_parameters()}


def test_model_export_command_writes_and_inspects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_sdk.cli import main

    zoo = Path(__file__).resolve().parent.parent / "examples" / "zoo" / "families.py"
    out = tmp_path / "mlp.onnx"
    argv = ["model", "export", f"{zoo}:MLP", "--input-shape", "2,12", "--out", str(out)]
    assert main([*argv, "--json"], only=["model"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["will_train"] and info["dimension"] == 736 and info["warnings"] == []
    ids = tmp_path / "bow.onnx"
    argv = ["model", "export", f"{zoo}:BagOfWords", "--input-shape", "2,7", "--out", str(ids)]
    assert main([*argv, "--input-dtype", "int64"], only=["model"]) == 0
    assert "dimension 196" in capsys.readouterr().out
    assert (
        main(["model", "export", "nope", "--input-shape", "2", "--out", "x"], only=["model"]) == 2
    )


def test_plain_pytorch_export_gets_a_warning_from_inspect() -> None:
    import io
    import warnings

    from edge_sdk.models.inspection import inspect_model

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_mlp().eval(), (torch.zeros(2, 6),), buffer, dynamo=False)
    info = inspect_model(onnx.load_from_string(buffer.getvalue()))
    assert any("export_torch" in w for w in info["warnings"])
