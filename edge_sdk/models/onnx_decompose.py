"""Rewrite compound ONNX operators into differentiable primitives before training.

The training-graph builder differentiates a small set of primitive operators.
PyTorch exports a few compound ones that carry weights; this module replaces
them, in a copy of the model used only for training, by exactly equivalent
graphs of primitives:

* ``Gelu`` (opset 20; both ``approximate`` modes) -> Erf or Tanh arithmetic;
* ``LayerNormalization`` -> ReduceMean, Sub, Mul, Sqrt, Reciprocal, Add;
* ``BatchNormalization`` with ``training_mode=1`` -> batch statistics (biased
  variance for normalising, like PyTorch) plus the running-statistics update
  with PyTorch's unbiased variance, reported as state updates;
* ``GRU`` and ``LSTM`` (one forward direction, no ``sequence_lens``, default
  activations) -> unrolled over the static sequence length.

All new constants are ``Constant`` nodes, never initializers, so they are not
mistaken for parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import ModelError, UnsupportedOperatorError

__all__ = ["COMPOUND_OPERATORS", "decompose"]

#: Operators this module rewrites.
COMPOUND_OPERATORS = frozenset({"Gelu", "LayerNormalization", "BatchNormalization", "GRU", "LSTM"})

Dims = list[int | None]


class _Emit:
    def __init__(self, taken: set[str], elem: int, opset: int, tag: str) -> None:
        self.taken = taken
        self.elem = elem
        self.np_dtype = np.float64 if elem == TensorProto.DOUBLE else np.float32
        self.opset = opset
        self.tag = tag
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def fresh(self, hint: str) -> str:
        while True:
            self._n += 1
            name = f"edgefl/{self.tag}/{hint}_{self._n}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        name = out or self.fresh(op_type)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [name], name=self.fresh("n"), **attrs)
        )
        return name

    def ops(self, op_type: str, inputs: Sequence[str], n: int, **attrs: Any) -> list[str]:
        outs = [self.fresh(op_type) for _ in range(n)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.fresh("n"), **attrs)
        )
        return outs

    def const(self, array: np.ndarray[Any, Any]) -> str:
        return self.op("Constant", [], value=numpy_helper.from_array(array))

    def f(self, value: float) -> str:
        return self.const(np.array(value, dtype=self.np_dtype))

    def i64(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), dtype=np.int64))

    def mean(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.i64(axes)], keepdims=1)
        return self.op("ReduceMean", [x], axes=list(axes), keepdims=1)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.i64(axes)])

    def squeeze0(self, x: str) -> str:
        return self.op("Squeeze", [x, self.i64([0])])


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _label(node: onnx.NodeProto) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


def _gelu(e: _Emit, node: onnx.NodeProto) -> None:
    x, y = node.input[0], node.output[0]
    approx = _attrs(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    if approx == "tanh":
        cube = e.op("Mul", [e.op("Mul", [x, x]), x])
        inner = e.op("Add", [x, e.op("Mul", [cube, e.f(0.044715)])])
        t = e.op("Tanh", [e.op("Mul", [inner, e.f(math.sqrt(2.0 / math.pi))])])
    else:
        t = e.op("Erf", [e.op("Mul", [x, e.f(1.0 / math.sqrt(2.0))])])
    half = e.op("Mul", [x, e.f(0.5)])
    e.op("Mul", [half, e.op("Add", [t, e.f(1.0)])], out=y)


def _normalise(e: _Emit, x: str, axes: Sequence[int], eps: float) -> tuple[str, str, str]:
    """Return (x_hat, mean, biased variance), statistics kept over ``axes``."""
    mean = e.mean(x, axes)
    centred = e.op("Sub", [x, mean])
    var = e.mean(e.op("Mul", [centred, centred]), axes)
    inv = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.f(eps)])])])
    return e.op("Mul", [centred, inv]), mean, var


def _layer_norm(e: _Emit, node: onnx.NodeProto, rank: int) -> None:
    at = _attrs(node)
    if any(o for o in node.output[1:]):
        raise UnsupportedOperatorError(
            f"{_label(node)}: the Mean / InvStdDev outputs of LayerNormalization are not supported"
        )
    axis = int(at.get("axis", -1)) % rank
    xhat, _, _ = _normalise(e, node.input[0], range(axis, rank), float(at.get("epsilon", 1e-5)))
    scaled = e.op("Mul", [xhat, node.input[1]])
    if len(node.input) > 2 and node.input[2]:
        e.op("Add", [scaled, node.input[2]], out=node.output[0])
    else:
        e.op("Identity", [scaled], out=node.output[0])


def _batch_norm(
    e: _Emit, node: onnx.NodeProto, rank: int, inits: set[str], state: dict[str, str]
) -> None:
    at = _attrs(node)
    x, scale, bias, running_mean, running_var = node.input[:5]
    momentum = float(at.get("momentum", 0.9))
    axes = [0, *range(2, rank)]
    xhat, mean, var = _normalise(e, x, axes, float(at.get("epsilon", 1e-5)))
    extra = list(range(1, rank - 1))
    s = e.unsqueeze(scale, extra) if extra else scale
    b = e.unsqueeze(bias, extra) if extra else bias
    e.op("Add", [e.op("Mul", [xhat, s]), b], out=node.output[0])
    # Running statistics: PyTorch's update, with the unbiased batch variance.
    size = e.op("Cast", [e.op("Size", [x])], to=e.elem)
    channels = e.op("Cast", [e.op("Gather", [e.op("Shape", [x]), e.i64([1])])], to=e.elem)
    count = e.op("Div", [size, channels])
    bessel = e.op("Div", [count, e.op("Max", [e.op("Sub", [count, e.f(1.0)]), e.f(1.0)])])
    flat_mean = e.op("Reshape", [mean, e.i64([-1])])
    flat_var = e.op("Mul", [e.op("Reshape", [var, e.i64([-1])]), bessel])
    for slot, running, batch in ((1, running_mean, flat_mean), (2, running_var, flat_var)):
        out = node.output[slot] if len(node.output) > slot and node.output[slot] else None
        new = e.op(
            "Add",
            [e.op("Mul", [running, e.f(momentum)]), e.op("Mul", [batch, e.f(1.0 - momentum)])],
            out=out,
        )
        if running in inits:
            state[running] = new


def _rnn(e: _Emit, node: onnx.NodeProto, dims: dict[str, Dims | None]) -> None:
    lstm = node.op_type == "LSTM"
    at = _attrs(node)
    gates = 4 if lstm else 3
    hidden = int(at["hidden_size"])
    direction = at.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    problems = []
    if direction != "forward":
        problems.append(f"direction={direction!r}")
    if int(at.get("layout", 0)) != 0:
        problems.append("layout=1")
    if "activations" in at or "clip" in at:
        problems.append("custom activations or clip")
    if lstm and int(at.get("input_forget", 0)):
        problems.append("input_forget=1")
    ins = list(node.input) + [""] * 8
    if ins[4]:
        problems.append("sequence_lens")
    if lstm and ins[7]:
        problems.append("peepholes")
    x_dims = dims.get(ins[0])
    if x_dims is None or len(x_dims) != 3 or x_dims[0] is None:
        problems.append(f"a static sequence length (input shape {x_dims})")
    if problems:
        raise UnsupportedOperatorError(
            f"{_label(node)} cannot be unrolled for training: unsupported {', '.join(problems)}"
        )
    assert x_dims is not None and x_dims[0] is not None
    steps = int(x_dims[0])
    x, w, r, bias = ins[0], ins[1], ins[2], ins[3]
    wt = e.op("Transpose", [e.squeeze0(w)], perm=[1, 0])  # (I, gates*H)
    rt = e.op("Transpose", [e.squeeze0(r)], perm=[1, 0])  # (H, gates*H)
    xw = e.op("MatMul", [x, wt])  # (T, B, gates*H)
    rb: str | None = None
    if bias:
        wb, rb = e.ops("Split", [e.squeeze0(bias), e.i64([gates * hidden] * 2)], 2, axis=0)
        xw = e.op("Add", [xw, wb])
    lbr = (not lstm) and int(at.get("linear_before_reset", 0)) == 1
    if not lstm and not lbr:  # reset gate applies before the recurrent product
        rt_zr, rt_h = e.ops("Split", [rt, e.i64([2 * hidden, hidden])], 2, axis=1)
        if rb is not None:
            rb_zr, rb_h = e.ops("Split", [rb, e.i64([2 * hidden, hidden])], 2, axis=0)

    def initial(slot: int) -> str:
        if ins[slot]:
            return e.squeeze0(ins[slot])
        batch = e.op("Gather", [e.op("Shape", [x]), e.i64([1])])
        shape = e.op("Concat", [batch, e.i64([hidden])], axis=0)
        zero = numpy_helper.from_array(np.zeros(1, dtype=e.np_dtype))
        return e.op("ConstantOfShape", [shape], value=zero)

    h = initial(5)
    c = initial(6) if lstm else ""
    outputs: list[str] = []
    for t in range(steps):
        xt = e.op("Gather", [xw, e.const(np.array(t, dtype=np.int64))], axis=0)  # (B, gates*H)
        xs = e.ops("Split", [xt, e.i64([hidden] * gates)], gates, axis=1)
        if lstm or lbr:
            hr = e.op("MatMul", [h, rt])
            if rb is not None:
                hr = e.op("Add", [hr, rb])
            hs = e.ops("Split", [hr, e.i64([hidden] * gates)], gates, axis=1)
        if lstm:
            i = e.op("Sigmoid", [e.op("Add", [xs[0], hs[0]])])
            o = e.op("Sigmoid", [e.op("Add", [xs[1], hs[1]])])
            f = e.op("Sigmoid", [e.op("Add", [xs[2], hs[2]])])
            cand = e.op("Tanh", [e.op("Add", [xs[3], hs[3]])])
            c = e.op("Add", [e.op("Mul", [f, c]), e.op("Mul", [i, cand])])
            h = e.op("Mul", [o, e.op("Tanh", [c])])
        else:
            if lbr:
                z = e.op("Sigmoid", [e.op("Add", [xs[0], hs[0]])])
                rg = e.op("Sigmoid", [e.op("Add", [xs[1], hs[1]])])
                n = e.op("Tanh", [e.op("Add", [xs[2], e.op("Mul", [rg, hs[2]])])])
            else:
                hzr = e.op("MatMul", [h, rt_zr])
                if rb is not None:
                    hzr = e.op("Add", [hzr, rb_zr])
                hz, hrr = e.ops("Split", [hzr, e.i64([hidden, hidden])], 2, axis=1)
                z = e.op("Sigmoid", [e.op("Add", [xs[0], hz])])
                rg = e.op("Sigmoid", [e.op("Add", [xs[1], hrr])])
                hh = e.op("MatMul", [e.op("Mul", [rg, h]), rt_h])
                if rb is not None:
                    hh = e.op("Add", [hh, rb_h])
                n = e.op("Tanh", [e.op("Add", [xs[2], hh])])
            h = e.op("Add", [n, e.op("Mul", [z, e.op("Sub", [h, n])])])
        outputs.append(h)
    outs = [*node.output, "", "", ""]
    if outs[0]:
        stacked = e.op("Concat", [e.unsqueeze(o, [0]) for o in outputs], axis=0)
        e.op("Unsqueeze", [stacked, e.i64([1])], out=outs[0])
    if outs[1]:
        e.op("Unsqueeze", [h, e.i64([0])], out=outs[1])
    if lstm and outs[2]:
        e.op("Unsqueeze", [c, e.i64([0])], out=outs[2])


def decompose(
    model: onnx.ModelProto, dims: dict[str, Dims | None], elem: int
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Replace compound operators by primitives (see the module docstring).

    Args:
        model: a shape-inferred model (opset >= 17).
        dims: tensor name -> dims (None where unknown), from shape inference.
        elem: the model's float element type.

    Returns:
        (the rewritten model, or ``model`` itself when nothing changed;
        state updates: running-statistics initializer -> tensor holding its
        value after the step).
    """
    graph = model.graph
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 17)
    inits = {t.name for t in graph.initializer}
    wanted = [
        n
        for n in graph.node
        if n.domain in ("", "ai.onnx")
        and n.op_type in COMPOUND_OPERATORS
        and (n.op_type != "BatchNormalization" or int(_attrs(n).get("training_mode", 0)))
    ]
    if not wanted:
        return model, {}
    taken = {x for n in graph.node for x in [*n.input, *n.output, n.name]} | inits
    taken |= {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
    state: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if node not in wanted:
            nodes.append(node)
            continue
        e = _Emit(taken, elem, opset, f"{node.op_type.lower()}{index}")
        rank_dims = dims.get(node.input[0])
        if node.op_type in ("LayerNormalization", "BatchNormalization") and rank_dims is None:
            raise ModelError(f"{_label(node)}: the rank of its input is unknown")
        rank = len(rank_dims or [])
        if node.op_type == "Gelu":
            _gelu(e, node)
        elif node.op_type == "LayerNormalization":
            _layer_norm(e, node, rank)
        elif node.op_type == "BatchNormalization":
            _batch_norm(e, node, rank, inits, state)
        else:
            _rnn(e, node, dims)
        nodes.extend(e.nodes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    return out, state


def batchnorm_to_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy with every training-mode BatchNormalization in inference mode."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "BatchNormalization" and int(_attrs(node).get("training_mode", 0)):
            for a in node.attribute:
                if a.name == "training_mode":
                    a.i = 0
            del node.output[1:]
    return out
