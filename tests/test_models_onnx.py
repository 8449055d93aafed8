"""OnnxModel loading, fine-tuning, export and the digits zoo models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import DecodeError, ModelError, UnsupportedOperatorError
from edge_sdk.models import OnnxModel, TrainConfig, zoo

ROOT = Path(__file__).resolve().parent.parent


def _data(n: int = 64, shape: tuple[int, ...] = (64,)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, size=n)


def test_from_file_and_from_bytes_load_the_same_model(tmp_path: Path) -> None:
    proto = zoo.digits_mlp(hidden=16, seed=3)
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    a = OnnxModel.from_file(path)
    b = OnnxModel.from_bytes(proto.SerializeToString())
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())
    assert a.layout == b.layout
    assert a.layout.names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def test_garbage_bytes_are_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        OnnxModel.from_bytes(b"\x08\x07not an onnx model at all\xff\xff")


def test_unsupported_operator_is_reported_when_loading() -> None:
    proto = zoo.digits_mlp(hidden=4)
    for node in proto.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Elu"
    with pytest.raises(UnsupportedOperatorError, match="act1"):
        OnnxModel(proto)


def test_float64_models_are_rejected_by_onnx_model() -> None:
    with pytest.raises(ModelError, match="float32"):
        OnnxModel(zoo.mlp(4, 3, 2, dtype=np.float64))


def test_models_with_two_data_inputs_are_rejected() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["s", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(np.ones(2, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="one data input"):
        OnnxModel(model, loss="mse")


def test_fine_tuning_a_head_leaves_the_body_untouched() -> None:
    x, y = _data()
    model = OnnxModel(zoo.digits_mlp(hidden=16), trainable=["fc2.weight", "fc2.bias"])
    assert model.layout.names == ("fc2.weight", "fc2.bias")
    model.fit(x, y, config=TrainConfig(epochs=3, lr=0.5), seed=0)
    exported = onnx.load_from_string(model.export_onnx())
    original = {
        t.name: numpy_helper.to_array(t) for t in zoo.digits_mlp(hidden=16).graph.initializer
    }
    trained = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    np.testing.assert_array_equal(trained["fc1.weight"], original["fc1.weight"])
    np.testing.assert_array_equal(trained["fc1.bias"], original["fc1.bias"])
    assert not np.array_equal(trained["fc2.weight"], original["fc2.weight"])


def test_flat_rows_are_reshaped_to_the_cnn_input() -> None:
    x, _y = _data()
    model = OnnxModel(zoo.digits_cnn())
    np.testing.assert_array_equal(model.predict(x), model.predict(x.reshape(-1, 1, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros((2, 65), dtype=np.float32))


def test_exported_model_reloads_with_the_trained_weights() -> None:
    x, y = _data(shape=(1, 8, 8))
    model = OnnxModel(zoo.digits_cnn())
    model.fit(x, y, config=TrainConfig(epochs=2, lr=0.1), seed=1)
    blob = model.export_onnx()
    again = OnnxModel.from_bytes(blob)
    np.testing.assert_array_equal(again.get_flat(), model.get_flat())
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(None, {"input": x})[0], model.predict(x), rtol=1e-5, atol=1e-6
    )


def test_binary_model_ending_in_sigmoid_reports_probabilities() -> None:
    proto = zoo.mlp(3, 4, 1, seed=2, activation="tanh")
    sig = helper.make_node("Sigmoid", ["logits"], ["prob"])
    proto.graph.node.append(sig)
    proto.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1])
    )
    onnx.checker.check_model(proto)
    model = OnnxModel(proto, loss="binary_cross_entropy")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    model.fit(x, y, config=TrainConfig(epochs=30, batch_size=10, lr=0.5), seed=0)
    probs = model.predict(x)
    assert np.all((probs >= 0) & (probs <= 1))
    metrics = model.evaluate(x, y)
    assert metrics["accuracy"] == pytest.approx(float(np.mean((probs[:, 0] > 0.5) == (y > 0.5))))
    assert metrics["accuracy"] > 0.9


def test_bce_targets_outside_zero_one_are_rejected() -> None:
    model = OnnxModel(zoo.mlp(3, 2, 1), loss="binary_cross_entropy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.evaluate(np.zeros((2, 3)), np.array([0.0, 2.0]))


def test_labels_outside_the_classes_are_rejected() -> None:
    model = OnnxModel(zoo.digits_mlp(hidden=4))
    with pytest.raises(ValueError, match="labels"):
        model.evaluate(np.zeros((2, 64)), np.array([0, 10]))


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        OnnxModel(zoo.digits_mlp(hidden=4), threads=0)


@pytest.mark.parametrize("build", [zoo.digits_mlp, zoo.digits_cnn], ids=["mlp", "cnn"])
def test_digits_models_learn_the_digits(build: object) -> None:
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = zoo.load_digits()
    model = OnnxModel(build())  # type: ignore[operator]
    model.fit(x_train, y_train, config=TrainConfig(epochs=4, lr=0.1, momentum=0.9), seed=0)
    assert model.evaluate(x_test, y_test)["accuracy"] > 0.85


def test_zoo_models_are_seeded() -> None:
    a, b, c = zoo.digits_mlp(seed=1), zoo.digits_mlp(seed=1), zoo.digits_mlp(seed=2)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()
    assert OnnxModel(zoo.digits_mlp()).layout.size == 64 * 64 + 64 + 64 * 10 + 10


def test_zoo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        zoo.mlp(4, 3, 2, activation="gelu")
    with pytest.raises(ValueError):
        zoo.mlp(4, [0], 2)
    with pytest.raises(ValueError):
        zoo.digits_cnn(channels=(0, 4))


def test_example_builds_both_models(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "build_digits_models.py"),
            "--out",
            str(tmp_path),
            "--train",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("digits_mlp.onnx", "digits_cnn.onnx"):
        model = onnx.load(tmp_path / name)
        onnx.checker.check_model(model, full_check=True)
        assert name in proc.stdout
