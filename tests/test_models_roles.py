"""Every initializer is trainable, frozen or a constant: no silent partial training."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import DecodeError, ModelError, UnsupportedOperatorError
from edge_sdk.models import OnnxModel, UntrainableWeightError, zoo
from edge_sdk.models.onnx_autodiff import FROZEN_METADATA_KEY, TRAINABLE_METADATA_KEY, plan_graph


def _model(
    extra_nodes: list[onnx.NodeProto], extra_inits: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """logits = Gemm(x, W, b) + side, where ``side`` is built by ``extra_nodes``."""
    rng = np.random.default_rng(0)
    inits = {
        "fc.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "fc.bias": rng.normal(size=(3,)).astype(np.float32),
        **extra_inits,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["z"], name="fc", transB=1),
        *extra_nodes,
        helper.make_node("Add", ["z", "side"], ["logits"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _blocked_model() -> onnx.ModelProto:
    """``scale`` reaches the loss only through Cos, which has no gradient rule."""
    nodes = [
        helper.make_node("Cos", ["scale"], ["cos"], name="my_cos"),
        helper.make_node("Mul", ["cos", "x3"], ["side"], name="mul"),
    ]
    x3 = np.ones((1, 3), dtype=np.float32)
    return _model(nodes, {"scale": np.full((3,), 0.5, dtype=np.float32), "x3": x3})


def test_weight_behind_an_unsupported_operator_is_an_error_naming_it() -> None:
    with pytest.raises(UntrainableWeightError, match=r"'scale'.*my_cos.*Cos") as info:
        OnnxModel(_blocked_model())
    assert "scale" in info.value.blocked
    assert isinstance(info.value, UnsupportedOperatorError)
    assert isinstance(info.value, ModelError)


def test_frozen_makes_it_load_and_repr_counts_the_roles() -> None:
    model = OnnxModel(_blocked_model(), frozen=["scale"])
    assert model.roles["trainable"] == ("fc.weight", "fc.bias", "x3")
    assert model.roles["frozen"] == ("scale",)
    assert model.parameter_counts() == {"trainable": 18, "frozen": 3, "constant": 0}
    text = repr(model)
    assert "trainable=3 tensors/18 values" in text
    assert "frozen=1 tensors/3 values" in text
    assert "constant=0 tensors/0 values" in text


def test_constants_and_globs_mark_initializers() -> None:
    model = OnnxModel(_blocked_model(), constants=["sc*", "x3"])
    assert model.roles["constant"] == ("scale", "x3")
    assert model.roles["trainable"] == ("fc.weight", "fc.bias")
    frozen = OnnxModel(_blocked_model(), frozen=["scale"], trainable=["fc.*"])
    assert frozen.roles["frozen"] == ("scale", "x3")


def test_an_explicit_trainable_list_freezes_the_rest() -> None:
    model = OnnxModel(_blocked_model(), trainable=["fc.weight"])
    assert model.roles["trainable"] == ("fc.weight",)
    assert set(model.roles["frozen"]) == {"fc.bias", "scale", "x3"}


def test_naming_a_blocked_weight_as_trainable_is_an_error() -> None:
    with pytest.raises(UntrainableWeightError, match="scale"):
        OnnxModel(_blocked_model(), trainable=["fc.*", "scale"])


def test_patterns_that_match_nothing_are_errors() -> None:
    with pytest.raises(ModelError, match="nope"):
        OnnxModel(_blocked_model(), frozen=["nope"])
    with pytest.raises(ModelError, match="both"):
        OnnxModel(_blocked_model(), frozen=["scale"], constants=["scale"])
    with pytest.raises(ModelError, match="trainable and fixed"):
        OnnxModel(_blocked_model(), trainable=["fc.*"], frozen=["fc.bias"])


def test_structural_inputs_are_constants_without_being_named() -> None:
    plan = plan_graph(zoo.digits_mlp(hidden=4))
    assert plan.constants == ()
    shape = np.array([-1, 3], dtype=np.int64)
    nodes = [helper.make_node("Reshape", ["x3", "shape"], ["side"], name="reshape")]
    model = _model(nodes, {"x3": np.ones((1, 3), dtype=np.float32), "shape": shape})
    roles = OnnxModel(model).roles
    assert roles["constant"] == ("shape",)


def test_metadata_lists_the_parameters_and_the_rest_are_constants() -> None:
    model = _blocked_model()
    for key, value in (
        (TRAINABLE_METADATA_KEY, '["fc.weight", "fc.bias"]'),
        (FROZEN_METADATA_KEY, '["x3"]'),
    ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    loaded = OnnxModel(model)
    assert loaded.roles == {
        "trainable": ("fc.weight", "fc.bias"),
        "frozen": ("x3",),
        "constant": ("scale",),
    }
    exported = onnx.load_from_string(loaded.export_onnx())
    assert {p.key for p in exported.metadata_props} >= {TRAINABLE_METADATA_KEY}


def test_bad_metadata_is_rejected() -> None:
    model = _blocked_model()
    entry = model.metadata_props.add()
    entry.key, entry.value = TRAINABLE_METADATA_KEY, '["ghost"]'
    with pytest.raises(ModelError, match="ghost"):
        OnnxModel(model)
    entry.value = "{not json"
    with pytest.raises(ModelError, match="JSON"):
        OnnxModel(model)


def test_external_data_is_read_next_to_the_file(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    proto = zoo.mlp(4, 8, 3)
    onnx.save_model(
        proto,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    model = OnnxModel.from_file(tmp_path / "m.onnx")
    assert model.layout.size == OnnxModel(zoo.mlp(4, 8, 3)).layout.size
    with pytest.raises(ModelError, match="external-data"):
        OnnxModel(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(DecodeError, match="missing next to the model"):
        OnnxModel.from_file(tmp_path / "m.onnx")
