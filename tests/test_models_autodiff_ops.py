"""Gradient checks of the operators added for exported PyTorch models.

Same method as ``test_models_autodiff.py`` (float64 training graph vs central
finite differences, then onnxruntime float32 vs the float64 gradients), for
Erf, Sqrt, Reciprocal, Pow, Abs, Clip, the reductions, Gather, Slice, Split,
Expand, Where, Cast, Sum/Max/Min and the compound operators rewritten at
load (Gelu, LayerNormalization, BatchNormalization in training mode, GRU, LSTM).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_sdk.models import SUPPORTED_OPERATORS, build_training_graph
from edge_sdk.models.onnx_autodiff import LOSS_OUTPUT, grad_output_name
from tests.test_models_autodiff import Case, _analytic, _feeds, _numeric, _prelude, _r, n


def _unary(op: str, shape: tuple[int, ...] = (3, 4), positive: bool = False, **a: Any) -> Case:
    pre, w = _prelude(shape)
    x = _r(*shape, low=0.5) if positive else _r(*shape)
    if positive:
        w["w0"] = _r(*shape, seed=1, low=0.5)
    return Case([*pre, n(op, ["h"], **a)], x, w, shape)


def _with_consts(
    op: str,
    out: tuple[int, ...],
    consts: dict[str, np.ndarray],
    shape: tuple[int, ...] = (2, 3, 4),
    **a: Any,
) -> Case:
    pre, w = _prelude(shape)
    return Case([*pre, n(op, ["h", *consts], **a)], _r(*shape), w, out, consts=dict(consts))


def _i(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _pow() -> Case:
    pre, w = _prelude((3, 4))
    w["w0"] = _r(3, 4, seed=1, low=0.5)
    w["p"] = np.array([1.5, 2.0, 0.5, 3.0])
    return Case([*pre, n("Pow", ["h", "p"])], _r(3, 4, low=0.5), w, (3, 4))


def _pow_const() -> Case:
    pre, w = _prelude((3, 4))
    two = helper.make_node(
        "Constant", [], ["two"], value=helper.make_tensor("v", TensorProto.DOUBLE, [], [2.0])
    )
    return Case([*pre, two, n("Pow", ["h", "two"])], _r(3, 4), w, (3, 4))


def _clip(lo: float | None, hi: float | None) -> Case:
    pre, w = _prelude((4, 5))
    consts: dict[str, np.ndarray] = {}
    ins = ["h"]
    for name, value in (("lo", lo), ("hi", hi)):
        if value is None:
            ins.append("")
        else:
            consts[name] = np.array(value)
            ins.append(name)
    while ins[-1] == "":
        ins.pop()
    x = np.linspace(-2.13, 2.31, 20).reshape(4, 5)
    w["w0"] = np.full((4, 5), 1.7)
    return Case([*pre, n("Clip", ins)], x, w, (4, 5), consts=consts)


def _reduce(op: str, out: tuple[int, ...], axes: list[int] | None, keepdims: int) -> Case:
    """ReduceSum takes axes as an input at opset 17; ReduceMean / ReduceMax as an attribute."""
    pre, w = _prelude((2, 3, 4))
    consts: dict[str, np.ndarray] = {}
    attrs: dict[str, Any] = {"keepdims": keepdims}
    ins = ["h"]
    if axes is not None and op == "ReduceSum":
        consts["axes"] = np.array(axes, dtype=np.int64)
        ins.append("axes")
    elif axes is not None:
        attrs["axes"] = axes
    return Case([*pre, n(op, ins, **attrs)], _r(2, 3, 4), w, out, consts=consts)


def _reduce_max_ties() -> Case:
    pre, w = _prelude((2, 3))
    x = np.array([[1.0, 1.0, 0.5], [0.2, 0.9, 0.9]])
    w["w0"] = np.ones((2, 3))
    return Case([*pre, n("ReduceMax", ["h"], axes=[1], keepdims=0)], x, w, (2,))


def _gather(axis: int, idx: np.ndarray, out: tuple[int, ...]) -> Case:
    w = {"table": _r(5, 3, seed=3)}
    nodes = [n("Gather", ["table", "idx"], ["g"], axis=axis), n("Mul", ["g", "x"])]
    return Case(nodes, _r(*out), w, out, consts={"idx": idx})


def _where() -> Case:
    pre, w = _prelude((3, 4))
    w["b"] = _r(4, seed=2)
    x = _r(3, 4)
    nodes = [*pre, n("Greater", ["x", "zero"], ["c"]), n("Where", ["c", "h", "b"])]
    return Case(nodes, x, w, (3, 4), consts={"zero": np.array(0.0)})


def _split(outputs: int) -> Case:
    pre, w = _prelude((2, 6))
    outs = [f"s{i}" for i in range(3)]
    nodes = [*pre, n("Split", ["h", "sizes"], outs, axis=1)]
    used = outs[:outputs]
    nodes.append(n("Concat", used, ["y"], axis=1))
    width = [1, 2, 3][:outputs]
    return Case(nodes, _r(2, 6), w, (2, sum(width)), consts={"sizes": _i(1, 2, 3)})


def _expand() -> Case:
    w = {"b": _r(1, 4, seed=5)}
    nodes = [n("Expand", ["b", "shape"], ["e"]), n("Mul", ["e", "x"])]
    return Case(nodes, _r(3, 4), w, (3, 4), consts={"shape": _i(3, 4)})


def _variadic(op: str) -> Case:
    pre, w = _prelude((3, 4))
    w["b"] = _r(4, seed=6)
    w["c"] = _r(3, 1, seed=7)
    return Case([*pre, n(op, ["h", "b", "c"])], _r(3, 4), w, (3, 4))


def _cast() -> Case:
    pre, w = _prelude((3, 4))
    # double -> double keeps the float64 check exact; the float32 run casts float -> float
    return Case([*pre, n("Cast", ["h"], to=TensorProto.DOUBLE)], _r(3, 4), w, (3, 4))


def _layer_norm(with_bias: bool = True) -> Case:
    pre, w = _prelude((2, 3, 4))
    w["scale"] = _r(4, seed=8)
    ins = ["h", "scale"]
    if with_bias:
        w["bias"] = _r(4, seed=9)
        ins.append("bias")
    return Case(
        [*pre, n("LayerNormalization", ins, axis=-1, epsilon=1e-5)], _r(2, 3, 4), w, (2, 3, 4)
    )


def _bn_train(x_shape: tuple[int, ...]) -> Case:
    pre, w = _prelude(x_shape)
    c = x_shape[1]
    w["scale"] = _r(c, seed=8)
    w["bias"] = _r(c, seed=9)
    consts = {"mean": _r(c, seed=10), "var": _r(c, seed=11, low=0.5)}
    node = n(
        "BatchNormalization",
        ["h", "scale", "bias", "mean", "var"],
        ["y", "rm", "rv"],
        epsilon=1e-3,
        momentum=0.9,
        training_mode=1,
    )
    return Case([*pre, node], _r(*x_shape), w, x_shape, consts=consts)


def _rnn(op: str, lbr: int = 1, bias: bool = True, initial: bool = False) -> Case:
    steps, batch, inp, hid = 3, 2, 3, 2
    gates = 4 if op == "LSTM" else 3
    w = {
        "W": _r(1, gates * hid, inp, seed=20) * 0.5,
        "R": _r(1, gates * hid, hid, seed=21) * 0.5,
    }
    ins = ["x", "W", "R"]
    if bias:
        w["B"] = _r(1, 2 * gates * hid, seed=22) * 0.5
        ins.append("B")
    if initial:
        ins += ["", "h0"] if bias else ["", "", "h0"]
        w["h0"] = _r(1, batch, hid, seed=23)
    attrs: dict[str, Any] = {"hidden_size": hid}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = n(op, ins, ["Y", "Y_h"], **attrs)
    nodes = [
        node,
        n("Squeeze", ["Y_h", "zero"], ["h_last"]),
        n("Gemm", ["h_last", "fc"], ["y"], transB=1),
    ]
    w["fc"] = _r(3, hid, seed=24)
    return Case(nodes, _r(steps, batch, inp), w, (batch, 3), consts={"zero": _i(0)})


EXTRA_CASES: dict[str, Callable[[], Case]] = {
    "sqrt": lambda: _unary("Sqrt", positive=True),
    "reciprocal": lambda: _unary("Reciprocal", positive=True),
    "abs": lambda: _unary("Abs"),
    "pow": _pow,
    "pow-const-square": _pow_const,
    "clip-relu6": lambda: _clip(0.0, 1.5),
    "clip-min-only": lambda: _clip(-0.5, None),
    "clip-max-only": lambda: _clip(None, 0.7),
    "reduce-mean-axis": lambda: _reduce("ReduceMean", (2, 1, 4), [1], 1),
    "reduce-mean-all": lambda: _reduce("ReduceMean", (), None, 0),
    "reduce-sum-neg-axis": lambda: _reduce("ReduceSum", (2, 3), [-1], 0),
    "reduce-max": lambda: _reduce("ReduceMax", (2, 4), [1], 0),
    "reduce-sum-all": lambda: _reduce("ReduceSum", (1, 1, 1), None, 1),
    "gather-embedding": lambda: _gather(0, np.array([[0, 2, 2], [4, 1, 0]]), (2, 3, 3)),
    "gather-axis1-negative": lambda: _gather(1, np.array([-1, 0]), (5, 2)),
    "slice": lambda: _with_consts(
        "Slice", (2, 2, 2), {"st": _i(1, 0), "en": _i(3, 4), "ax": _i(1, 2), "sp": _i(1, 2)}
    ),
    "slice-negative-step": lambda: _with_consts(
        "Slice", (2, 3, 2), {"st": _i(-1), "en": _i(-5), "ax": _i(2), "sp": _i(-2)}
    ),
    "split-all-used": lambda: _split(3),
    "split-some-unused": lambda: _split(2),
    "expand": _expand,
    "where": _where,
    "sum": lambda: _variadic("Sum"),
    "max": lambda: _variadic("Max"),
    "min": lambda: _variadic("Min"),
    "cast": _cast,
    "squeeze": lambda: _with_consts("Squeeze", (2, 3, 4), {"axes": _i(1)}, shape=(2, 1, 3, 4)),
    "softmax-middle-axis": lambda: _unary("Softmax", shape=(2, 3, 4), axis=1),
    "log-softmax-axis0": lambda: _unary("LogSoftmax", shape=(2, 3, 4), axis=0),
    "layernorm": _layer_norm,
    "layernorm-no-bias": lambda: _layer_norm(False),
    "batchnorm-train-4d": lambda: _bn_train((3, 2, 2, 2)),
    "batchnorm-train-2d": lambda: _bn_train((5, 3)),
    "gru-linear-before-reset": lambda: _rnn("GRU", 1),
    "gru-reset-before": lambda: _rnn("GRU", 0),
    "gru-no-bias-initial-h": lambda: _rnn("GRU", 1, bias=False, initial=True),
    "lstm": lambda: _rnn("LSTM"),
    "lstm-initial-h": lambda: _rnn("LSTM", initial=True),
}


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_gradients_match_finite_differences_in_float64(name: str) -> None:
    case = EXTRA_CASES[name]()
    loss, grads = _analytic(case, np.float64)
    assert np.isfinite(loss)
    numeric = _numeric(case)
    for wname, value in case.weights.items():
        assert grads[wname].shape == value.shape
        np.testing.assert_allclose(
            grads[wname], numeric[wname], rtol=1e-5, atol=1e-7, err_msg=wname
        )


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_onnxruntime_float32_gradients_match_finite_differences(name: str) -> None:
    case = EXTRA_CASES[name]()
    if name == "cast":
        case.nodes[-1] = n("Cast", ["h"], to=TensorProto.FLOAT)
    graph = build_training_graph(case.model(np.float32), loss=case.loss)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [LOSS_OUTPUT, *(grad_output_name(w) for w in case.weights)]
    _, *grads32 = session.run(outputs, _feeds(case, case.weights, np.float32))
    numeric = _numeric(EXTRA_CASES[name]())
    for (wname, g64), g32 in zip(numeric.items(), grads32, strict=True):
        np.testing.assert_allclose(g32, g64, rtol=2e-4, atol=2e-5, err_msg=wname)


def _single_weight_model(op: str, opset: int, w0: np.ndarray, **attrs: Any) -> onnx.ModelProto:
    graph = helper.make_graph(
        [n("Mul", ["x", "w0"], ["h"]), n(op, ["h"], **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(w0.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(w0.shape))],
        initializer=[onnx.numpy_helper.from_array(w0.astype(np.float32), "w0")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(v)


@pytest.mark.parametrize(
    ("op", "opset", "attrs"),
    [("Erf", 17, {}), ("Gelu", 20, {}), ("Gelu", 20, {"approximate": "tanh"})],
    ids=["erf", "gelu-erf", "gelu-tanh"],
)
def test_erf_and_gelu_gradients_match_closed_forms(
    op: str, opset: int, attrs: dict[str, Any]
) -> None:
    x, w0 = _r(3, 4), _r(3, 4, seed=1)
    target = _r(3, 4, seed=2)
    graph = build_training_graph(_single_weight_model(op, opset, w0, **attrs), loss="mse")
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        "x": x.astype(np.float32),
        "edgefl_target": target.astype(np.float32),
        "w0": w0.astype(np.float32),
    }
    loss, grad = session.run([LOSS_OUTPUT, grad_output_name("w0")], feeds)
    h = x * w0
    pdf = np.exp(-h * h / 2) / math.sqrt(2 * math.pi)
    if op == "Erf":
        out, dout = _erf(h), 2 / math.sqrt(math.pi) * np.exp(-h * h)
    elif not attrs:  # exact GELU, PyTorch's default
        cdf = 0.5 * (1 + _erf(h / math.sqrt(2)))
        out, dout = h * cdf, cdf + h * pdf
    else:
        k = math.sqrt(2 / math.pi)
        inner = k * (h + 0.044715 * h**3)
        t = np.tanh(inner)
        out = 0.5 * h * (1 + t)
        dout = 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * k * (1 + 3 * 0.044715 * h * h)
    expected = 2 * (out - target) * dout * x / out.size
    assert float(loss) == pytest.approx(float(np.mean((out - target) ** 2)), rel=1e-5)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_every_added_operator_has_a_gradient_case() -> None:
    covered = {node.op_type for make in EXTRA_CASES.values() for node in make().nodes}
    covered |= {"Erf"}  # test_erf_and_gelu_gradients_match_closed_forms
    from tests.test_models_autodiff import CASES

    covered |= {node.op_type for make in CASES.values() for node in make().nodes}
    assert set(SUPPORTED_OPERATORS) <= covered
