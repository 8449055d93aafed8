"""Gradient checks of the ONNX training-graph builder, operator by operator.

Each case is a tiny float64 model. The training graph runs under onnx's
reference evaluator (pure numpy, float64) and its gradients are compared with
central finite differences of the loss; the same model in float32 then runs on
onnxruntime and must agree with the float64 gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edge_sdk.errors import ModelError, UnsupportedOperatorError
from edge_sdk.models import SUPPORTED_OPERATORS, OnnxModel, build_training_graph, zoo
from edge_sdk.models.onnx_autodiff import (
    LOSS_OUTPUT,
    TARGET_INPUT,
    build_eval_graph,
    grad_output_name,
    plan_graph,
)


@dataclass
class Case:
    """A model: data input ``x`` -> nodes -> output ``y`` with trainable weights."""

    nodes: list[onnx.NodeProto]
    x: np.ndarray
    weights: dict[str, np.ndarray]
    out_shape: tuple[int, ...]
    loss: str = "mse"
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    n_classes: int = 0

    def model(self, dtype: type[np.floating[Any]]) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in self.weights.items()]
        for k, v in self.consts.items():
            arr = v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v
            inits.append(numpy_helper.from_array(arr, k))
        graph = helper.make_graph(
            self.nodes,
            "case",
            [helper.make_tensor_value_info("x", elem, list(self.x.shape))],
            [helper.make_tensor_value_info("y", elem, list(self.out_shape))],
            initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model

    def target(self) -> np.ndarray:
        rng = np.random.default_rng(99)
        if self.loss == "softmax_cross_entropy":
            return rng.integers(0, self.n_classes, size=self.out_shape[0]).astype(np.int64)
        if self.loss == "binary_cross_entropy":
            return rng.uniform(size=self.out_shape)
        return rng.normal(size=self.out_shape)


def _r(*shape: int, seed: int = 0, low: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed + 17 * len(shape) + sum(shape))
    if low is not None:
        return rng.uniform(low, low + 1.0, size=shape)
    return rng.normal(size=shape)


def n(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs or ["y"], **attrs)


def _prelude(shape: tuple[int, ...]) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """h = x * w0, so that every operator's input depends on a trainable weight."""
    return [n("Mul", ["x", "w0"], ["h"])], {"w0": _r(*shape, seed=1)}


def unary(op: str, shape: tuple[int, ...] = (3, 4), positive: bool = False, **attrs: Any) -> Case:
    pre, w = _prelude(shape)
    x = _r(*shape, low=0.5) if positive else _r(*shape)
    if positive:
        w["w0"] = _r(*shape, seed=1, low=0.5)
    return Case([*pre, n(op, ["h"], **attrs)], x, w, shape)


def binary(op: str, b_shape: tuple[int, ...], swap: bool = False, positive: bool = False) -> Case:
    pre, w = _prelude((3, 4))
    w["b"] = _r(*b_shape, seed=2, low=0.5) if positive else _r(*b_shape, seed=2)
    ins = ["b", "h"] if swap else ["h", "b"]
    x = _r(3, 4, low=0.5) if positive else _r(3, 4)
    return Case([*pre, n(op, ins)], x, w, (3, 4))


def gemm(ta: int, tb: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None) -> Case:
    a_shape = (4, 3) if ta else (3, 4)
    b_shape = (5, 4) if tb else (4, 5)
    pre, w = _prelude(a_shape)
    w["B"] = _r(*b_shape, seed=3)
    inputs = ["h", "B"]
    if c_shape is not None:
        w["C"] = _r(*c_shape, seed=4)
        inputs.append("C")
    node = n("Gemm", inputs, transA=ta, transB=tb, alpha=alpha, beta=beta)
    return Case([*pre, node], _r(*a_shape), w, (3, 5))


def matmul(a_shape: tuple[int, ...], b_shape: tuple[int, ...], out: tuple[int, ...]) -> Case:
    pre, w = _prelude(a_shape)
    w["B"] = _r(*b_shape, seed=5)
    return Case([*pre, n("MatMul", ["h", "B"])], _r(*a_shape), w, out)


def conv(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    out: tuple[int, ...],
    bias: bool = True,
    **attrs: Any,
) -> Case:
    pre, w = _prelude(x_shape)
    w["W"] = _r(*w_shape, seed=6)
    inputs = ["h", "W"]
    if bias:
        w["B"] = _r(w_shape[0], seed=7)
        inputs.append("B")
    return Case([*pre, n("Conv", inputs, **attrs)], _r(*x_shape), w, out)


def pool(op: str, out: tuple[int, ...], x_shape: tuple[int, ...] = (2, 2, 5, 5), **a: Any) -> Case:
    pre, w = _prelude(x_shape)
    return Case([*pre, n(op, ["h"], **a)], _r(*x_shape), w, out)


def batchnorm(x_shape: tuple[int, ...]) -> Case:
    pre, w = _prelude(x_shape)
    c = x_shape[1]
    w["scale"] = _r(c, seed=8)
    w["bias"] = _r(c, seed=9)
    consts = {"mean": _r(c, seed=10), "var": _r(c, seed=11, low=0.5)}
    node = n("BatchNormalization", ["h", "scale", "bias", "mean", "var"], epsilon=1e-3)
    return Case([*pre, node], _r(*x_shape), w, x_shape, consts=consts)


def shape_op(
    op: str, out: tuple[int, ...], extra: dict[str, np.ndarray] | None = None, **a: Any
) -> Case:
    pre, w = _prelude((2, 3, 4))
    inputs = ["h", *(extra or {})]
    return Case([*pre, n(op, inputs, **a)], _r(2, 3, 4), w, out, consts=dict(extra or {}))


def concat() -> Case:
    pre, w = _prelude((3, 2))
    w["c"] = _r(3, 4, seed=12)
    return Case([*pre, n("Concat", ["h", "c", "h"], axis=1)], _r(3, 2), w, (3, 8))


def dropout() -> Case:
    pre, w = _prelude((3, 4))
    consts = {"ratio": np.array(0.5)}
    node = n("Dropout", ["h", "ratio"], ["y", "mask"])
    return Case([*pre, node], _r(3, 4), w, (3, 4), consts=consts)


def classifier(loss: str, head: str | None) -> Case:
    pre, w = _prelude((4, 3))
    w["W"] = _r(3, 5, seed=13)
    nodes = [*pre, n("MatMul", ["h", "W"], ["z"] if head else ["y"])]
    if head == "Softmax":
        nodes.append(n("Softmax", ["z"], axis=-1))
    elif head == "LogSoftmax":
        nodes.append(n("LogSoftmax", ["z"], axis=1))
    elif head == "Sigmoid":
        nodes.append(n("Sigmoid", ["z"]))
    return Case(nodes, _r(4, 3), w, (4, 5), loss=loss, n_classes=5)


CASES: dict[str, Callable[[], Case]] = {
    "add-same": lambda: binary("Add", (3, 4)),
    "add-row": lambda: binary("Add", (4,)),
    "add-col": lambda: binary("Add", (3, 1)),
    "add-scalar": lambda: binary("Add", ()),
    "sub-row": lambda: binary("Sub", (1, 4)),
    "sub-swapped": lambda: binary("Sub", (4,), swap=True),
    "mul-row": lambda: binary("Mul", (4,)),
    "mul-col-swapped": lambda: binary("Mul", (3, 1), swap=True),
    "div-row": lambda: binary("Div", (4,), positive=True),
    "div-swapped": lambda: binary("Div", (3, 1), swap=True, positive=True),
    "neg": lambda: unary("Neg"),
    "exp": lambda: unary("Exp"),
    "log": lambda: unary("Log", positive=True),
    "identity": lambda: unary("Identity"),
    "relu": lambda: unary("Relu"),
    "leaky-relu": lambda: unary("LeakyRelu", alpha=0.2),
    "leaky-relu-default": lambda: unary("LeakyRelu"),
    "sigmoid": lambda: unary("Sigmoid"),
    "tanh": lambda: unary("Tanh"),
    "softmax": lambda: unary("Softmax", axis=1),
    "softmax-3d-axis0": lambda: unary("Softmax", shape=(2, 3, 4), axis=0),
    "log-softmax": lambda: unary("LogSoftmax", shape=(2, 3, 4), axis=-1),
    "gemm": lambda: gemm(0, 0, 1.0, 1.0, (5,)),
    "gemm-transA": lambda: gemm(1, 0, 1.0, 1.0, (1, 5)),
    "gemm-transB": lambda: gemm(0, 1, 1.0, 1.0, (3, 5)),
    "gemm-transAB-alpha-beta": lambda: gemm(1, 1, 0.7, -1.3, (3, 1)),
    "gemm-scalar-c": lambda: gemm(0, 1, 2.0, 0.5, ()),
    "gemm-no-c": lambda: gemm(1, 0, 1.5, 1.0, None),
    "matmul-2d": lambda: matmul((3, 4), (4, 2), (3, 2)),
    "matmul-batched-weight-2d": lambda: matmul((2, 3, 4), (4, 2), (2, 3, 2)),
    "matmul-batched-broadcast": lambda: matmul((2, 3, 4), (1, 4, 2), (2, 3, 2)),
    "matmul-batched-full": lambda: matmul((2, 3, 4), (2, 4, 2), (2, 3, 2)),
    "flatten": lambda: shape_op("Flatten", (2, 12), axis=1),
    "reshape": lambda: shape_op("Reshape", (6, 4), {"shape": np.array([-1, 4], dtype=np.int64)}),
    "transpose": lambda: shape_op("Transpose", (4, 2, 3), perm=[2, 0, 1]),
    "transpose-default": lambda: shape_op("Transpose", (4, 3, 2)),
    "unsqueeze": lambda: shape_op(
        "Unsqueeze", (2, 1, 3, 4), {"axes": np.array([1], dtype=np.int64)}
    ),
    "concat": concat,
    "dropout": dropout,
    "conv": lambda: conv((2, 2, 5, 5), (3, 2, 3, 3), (2, 3, 3, 3)),
    "conv-pads-strides": lambda: conv(
        (2, 2, 6, 5), (3, 2, 3, 3), (2, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]
    ),
    "conv-asymmetric-pads-no-bias": lambda: conv(
        (1, 2, 5, 5), (2, 2, 2, 3), (1, 2, 6, 3), bias=False, pads=[1, 0, 1, 0]
    ),
    "conv-stride-remainder": lambda: conv((1, 1, 7, 6), (2, 1, 3, 2), (1, 2, 3, 3), strides=[2, 2]),
    "conv-dilations": lambda: conv((1, 2, 7, 7), (2, 2, 3, 3), (1, 2, 3, 3), dilations=[2, 2]),
    "conv-same-upper": lambda: conv(
        (1, 2, 5, 5), (2, 2, 3, 3), (1, 2, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]
    ),
    "conv-groups": lambda: conv((2, 4, 5, 5), (6, 2, 3, 3), (2, 6, 3, 3), group=2),
    "conv-depthwise": lambda: conv((1, 3, 4, 4), (3, 1, 3, 3), (1, 3, 4, 4), group=3, pads=[1] * 4),
    "conv-1d": lambda: conv((2, 2, 7), (3, 2, 3), (2, 3, 3), strides=[2], pads=[0, 1]),
    "maxpool": lambda: pool("MaxPool", (2, 2, 2, 2), kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool-overlapping-padded": lambda: pool(
        "MaxPool", (2, 2, 5, 5), kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    ),
    "maxpool-ceil": lambda: pool(
        "MaxPool", (2, 2, 3, 3), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1
    ),
    "avgpool": lambda: pool("AveragePool", (2, 2, 2, 2), kernel_shape=[2, 2], strides=[2, 2]),
    "avgpool-pads-exclude": lambda: pool(
        "AveragePool", (2, 2, 3, 3), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
    ),
    "avgpool-pads-include": lambda: pool(
        "AveragePool",
        (2, 2, 5, 5),
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        count_include_pad=1,
    ),
    "global-avgpool": lambda: pool("GlobalAveragePool", (2, 2, 1, 1)),
    "batchnorm-4d": lambda: batchnorm((2, 3, 2, 2)),
    "batchnorm-2d": lambda: batchnorm((4, 3)),
    "loss-softmax-ce": lambda: classifier("softmax_cross_entropy", None),
    "loss-softmax-ce-through-softmax": lambda: classifier("softmax_cross_entropy", "Softmax"),
    "loss-softmax-ce-through-logsoftmax": lambda: classifier("softmax_cross_entropy", "LogSoftmax"),
    "loss-bce-logits": lambda: classifier("binary_cross_entropy", None),
    "loss-bce-through-sigmoid": lambda: classifier("binary_cross_entropy", "Sigmoid"),
    "loss-mse": lambda: classifier("mse", None),
}


class _Runner:
    """Runs a graph on onnxruntime, or on onnx's reference evaluator where
    onnxruntime has no kernel for the dtype (e.g. float64 Conv)."""

    def __init__(self, graph: onnx.ModelProto) -> None:
        try:
            self.session: Any = ort.InferenceSession(
                graph.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Exception:  # NOT_IMPLEMENTED for this dtype
            self.session = ReferenceEvaluator(graph)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(outputs, feeds))


def _feeds(case: Case, weights: dict[str, np.ndarray], dtype: Any) -> dict[str, np.ndarray]:
    target = case.target()
    return {
        "x": case.x.astype(dtype),
        TARGET_INPUT: target if target.dtype == np.int64 else target.astype(dtype),
        **{k: v.astype(dtype) for k, v in weights.items()},
    }


def _analytic(case: Case, dtype: Any) -> tuple[float, dict[str, np.ndarray]]:
    graph = build_training_graph(case.model(dtype), loss=case.loss)
    outputs = [LOSS_OUTPUT, *(grad_output_name(w) for w in case.weights)]
    loss, *grads = _Runner(graph).run(outputs, _feeds(case, case.weights, dtype))
    return float(loss), dict(zip(case.weights, grads, strict=True))


def _numeric(case: Case) -> dict[str, np.ndarray]:
    """Central finite differences of the float64 loss (forward graph only)."""
    runner = _Runner(build_eval_graph(plan_graph(case.model(np.float64), loss=case.loss)))
    eps = 1e-6
    numeric = {}
    for wname, value in case.weights.items():
        out = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            bumped = {k: v.copy() for k, v in case.weights.items()}
            bumped[wname][idx] = value[idx] + eps
            up = runner.run([LOSS_OUTPUT], _feeds(case, bumped, np.float64))[0]
            bumped[wname][idx] = value[idx] - eps
            down = runner.run([LOSS_OUTPUT], _feeds(case, bumped, np.float64))[0]
            out[idx] = (float(up) - float(down)) / (2 * eps)
        numeric[wname] = out
    return numeric


# onnx's reference evaluator has no grouped ConvTranspose and onnxruntime no
# float64 ConvTranspose: these cases are checked in float32 only (below).
NO_FLOAT64_BACKWARD = {"conv-groups", "conv-depthwise"}


@pytest.mark.parametrize("name", sorted(set(CASES) - NO_FLOAT64_BACKWARD))
def test_gradients_match_finite_differences_in_float64(name: str) -> None:
    case = CASES[name]()
    loss, grads = _analytic(case, np.float64)
    assert np.isfinite(loss)
    numeric = _numeric(case)
    for wname, value in case.weights.items():
        assert grads[wname].shape == value.shape
        np.testing.assert_allclose(
            grads[wname], numeric[wname], rtol=1e-5, atol=1e-7, err_msg=wname
        )


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnxruntime_float32_gradients_match_finite_differences(name: str) -> None:
    case = CASES[name]()
    graph = build_training_graph(case.model(np.float32), loss=case.loss)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [LOSS_OUTPUT, *(grad_output_name(w) for w in case.weights)]
    _, *grads32 = session.run(outputs, _feeds(case, case.weights, np.float32))
    numeric = _numeric(case)
    for (wname, g64), g32 in zip(numeric.items(), grads32, strict=True):
        np.testing.assert_allclose(g32, g64, rtol=2e-4, atol=2e-5, err_msg=wname)


def test_every_supported_operator_has_a_gradient_case() -> None:
    covered = {node.op_type for make in CASES.values() for node in make().nodes}
    # Operators added for exported PyTorch models are checked in test_models_autodiff_ops.py.
    from tests.test_models_autodiff_ops import EXTRA_CASES

    covered |= {node.op_type for make in EXTRA_CASES.values() for node in make().nodes}
    assert set(SUPPORTED_OPERATORS) - covered <= {"Squeeze", "Erf"}


def test_squeeze_gradient_round_trips_the_shape() -> None:
    pre, w = _prelude((2, 1, 3))
    case = Case(
        [*pre, n("Squeeze", ["h", "axes"])],
        _r(2, 1, 3),
        w,
        (2, 3),
        consts={"axes": np.array([1], dtype=np.int64)},
    )
    _, grads = _analytic(case, np.float64)
    target = case.target()
    # d/dw0 of mean((x*w0 - t)^2) = 2 (x*w0 - t) x / numel, computed by hand
    expected = 2 * (case.x * w["w0"] - target.reshape(2, 1, 3)) * case.x / target.size
    np.testing.assert_allclose(grads["w0"], expected, rtol=1e-12)


def test_unsupported_operator_on_the_gradient_path_names_the_node() -> None:
    pre, w = _prelude((3, 4))
    case = Case([*pre, helper.make_node("Elu", ["h"], ["y"], name="my_elu")], _r(3, 4), w, (3, 4))
    with pytest.raises(UnsupportedOperatorError, match=r"my_elu.*Elu"):
        build_training_graph(case.model(np.float64), loss="mse")


def test_unsupported_operator_off_the_gradient_path_is_fine() -> None:
    # Elu acts on the data input only, before any trainable weight.
    nodes = [n("Elu", ["x"], ["e"]), n("Mul", ["e", "w0"], ["y"])]
    case = Case(nodes, _r(3, 4), {"w0": _r(3, 4, seed=1)}, (3, 4))
    _, grads = _analytic(case, np.float64)
    elu = np.where(case.x > 0, case.x, np.exp(case.x) - 1)
    expected = 2 * (elu * case.weights["w0"] - case.target()) * elu / 12
    np.testing.assert_allclose(grads["w0"], expected, rtol=1e-10)


def test_unsupported_error_is_a_model_error_with_a_reason() -> None:
    pre, w = _prelude((3, 4))
    case = Case([*pre, n("Cos", ["h"])], _r(3, 4), w, (3, 4))
    with pytest.raises(ModelError) as info:
        build_training_graph(case.model(np.float64), loss="mse")
    assert info.value.reason == "unsupported_operator"


def test_trainable_subset_only_outputs_those_gradients() -> None:
    model = zoo.mlp(4, 3, 2, dtype=np.float64)
    graph = build_training_graph(model, trainable=["fc2.weight", "fc2.bias"])
    outputs = [o.name for o in graph.graph.output]
    assert outputs == [LOSS_OUTPUT, grad_output_name("fc2.weight"), grad_output_name("fc2.bias")]
    inputs = {i.name for i in graph.graph.input}
    assert {"fc2.weight", "fc2.bias"} <= inputs and "fc1.weight" not in inputs


def test_batchnorm_running_statistics_are_not_trainable_by_default() -> None:
    case = batchnorm((2, 3, 2, 2))
    plan = plan_graph(case.model(np.float64), loss="mse")
    assert plan.trainable == ("w0", "scale", "bias")


def test_naming_a_non_trainable_initializer_is_rejected() -> None:
    case = batchnorm((2, 3, 2, 2))
    with pytest.raises(ModelError, match="mean"):
        plan_graph(case.model(np.float64), trainable=["mean"], loss="mse")
    with pytest.raises(ModelError, match="nope"):
        plan_graph(case.model(np.float64), trainable=["nope"], loss="mse")


def test_unknown_loss_is_rejected() -> None:
    with pytest.raises(ValueError, match="hinge"):
        build_training_graph(zoo.digits_mlp(), loss="hinge")


def test_integer_model_output_is_rejected() -> None:
    nodes = [n("Mul", ["x", "w0"], ["h"]), n("ArgMax", ["h"], axis=1)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
        initializer=[numpy_helper.from_array(_r(3, 4).astype(np.float32), "w0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="float32 and float64"):
        build_training_graph(model, loss="mse")


def test_training_graph_passes_the_full_checker() -> None:
    graph = build_training_graph(zoo.digits_cnn())
    onnx.checker.check_model(graph, full_check=True)


def test_old_opset_models_are_converted() -> None:
    model = zoo.mlp(4, 3, 2)
    model.opset_import[0].version = 13  # Gemm and Relu are unchanged since 13
    onnx.checker.check_model(model)
    graph = build_training_graph(model)
    assert {i.version for i in graph.opset_import if i.domain in ("", "ai.onnx")} == {17}


def test_weight_that_does_not_reach_the_loss_gets_a_zero_gradient() -> None:
    nodes = [n("Mul", ["x", "w0"], ["y"]), n("Mul", ["x", "w1"], ["side"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3, 4]),
            helper.make_tensor_value_info("side", TensorProto.DOUBLE, [3, 4]),
        ],
        initializer=[
            numpy_helper.from_array(_r(3, 4), "w0"),
            numpy_helper.from_array(_r(3, 4, seed=3), "w1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    train = build_training_graph(model, loss="mse")
    feeds = {"x": _r(3, 4), TARGET_INPUT: _r(3, 4, seed=4), "w0": _r(3, 4), "w1": _r(3, 4, seed=3)}
    out = ReferenceEvaluator(train).run([grad_output_name("w1")], feeds)[0]
    np.testing.assert_array_equal(out, np.zeros((3, 4)))


def test_onnx_model_exports_a_valid_inference_model_with_trained_weights() -> None:
    x, y = _r(40, 64).astype(np.float32), np.arange(40) % 10
    model = OnnxModel(zoo.digits_mlp(hidden=8))
    from edge_sdk.models import TrainConfig

    model.fit(x, y, config=TrainConfig(epochs=2, lr=0.1), seed=0)
    exported = onnx.load_from_string(model.export_onnx())
    onnx.checker.check_model(exported, full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    for name, value in model.weights().items():
        np.testing.assert_array_equal(weights[name], value)
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], model.predict(x), rtol=1e-6)


def test_dropout_in_training_mode_is_rejected() -> None:
    pre, w = _prelude((3, 4))
    case = Case(
        [*pre, n("Dropout", ["h", "ratio", "mode"], ["y"])],
        _r(3, 4),
        w,
        (3, 4),
        consts={"ratio": np.array(0.5), "mode": np.array(True)},
    )
    with pytest.raises(ModelError, match="training_mode"):
        build_training_graph(case.model(np.float64), loss="mse")
    case.consts["mode"] = np.array(False)
    build_training_graph(case.model(np.float64), loss="mse")
