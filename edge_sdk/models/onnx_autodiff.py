"""Reverse-mode differentiation of ONNX inference graphs into training graphs.

Stock onnxruntime has no training module (onnxruntime-training is deprecated
and never shipped for aarch64), so edgefl builds the training step itself: the
inference graph, a loss head, and the backward pass written with ordinary ONNX
operators, all in one graph that an ``onnxruntime.InferenceSession`` runs.
The trainable weights become graph inputs, so one session serves every step
while the caller updates the weights in place.

The training graph has these inputs and outputs:

* inputs: the model's data input(s), unchanged; :data:`TARGET_INPUT` (int64
  class labels of shape ``(N,)`` for softmax cross-entropy, otherwise a float
  tensor shaped like the model output); then every trainable weight, under its
  initializer name and shape.
* outputs: :data:`LOSS_OUTPUT` (a scalar, the mean loss of the batch), then
  ``grad_output_name(w)`` for each trainable weight ``w`` in order.

Differentiable operator set (default ONNX domain, opset >= 13; older models
are converted to opset 17 first): see :data:`SUPPORTED_OPERATORS` and
docs/models.md. Compound operators (Gelu, LayerNormalization, training-mode
BatchNormalization, GRU, LSTM) are first rewritten into primitives by
:mod:`edge_sdk.models.onnx_decompose`. Any operator is allowed where no
gradient has to flow through it (shape arithmetic, constants, a preprocessing
step on the input).

Every initializer gets one role (see :func:`plan_graph`): trainable, frozen
(the caller said so) or constant (non-float, structural, exporter- or
caller-marked). A weight that is none of these and cannot receive a gradient
raises :class:`UntrainableWeightError` naming it and the nodes in the way; no
weight is silently left untrained.

Losses: ``"mse"`` (mean over all output elements), ``"softmax_cross_entropy"``
(mean over the batch; the model output holds logits of shape ``(N, C)``) and
``"binary_cross_entropy"`` (on logits, mean over all elements). When the model
ends in Softmax / LogSoftmax (cross-entropy) or Sigmoid (binary
cross-entropy), the loss uses the tensor before that node as logits, the
numerically stable choice; the prediction output is unchanged.

Limits (checked, with a clear error where possible): a dimension that is
broadcast in Add/Sub/Mul/Div/Gemm's C must be statically 1 (symbolic
dimensions are assumed equal); Conv, pooling and BatchNormalization need
shapes that onnx shape inference can resolve (spatial sizes and channels);
Dropout never drops during training.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import ModelError, UnsupportedOperatorError
from edge_sdk.models.onnx_decompose import decompose


class UntrainableWeightError(UnsupportedOperatorError):
    """A weight cannot receive a gradient and was neither frozen nor marked constant.

    Attributes:
        blocked: weight name -> descriptions of the nodes in the way.
    """

    def __init__(self, message: str, *, blocked: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.blocked = blocked


__all__ = [
    "LOSSES",
    "LOSS_OUTPUT",
    "SUPPORTED_OPERATORS",
    "FROZEN_METADATA_KEY",
    "TARGET_INPUT",
    "TRAINABLE_METADATA_KEY",
    "GraphPlan",
    "UntrainableWeightError",
    "build_eval_graph",
    "build_training_graph",
    "grad_output_name",
    "plan_graph",
    "state_output_name",
    "weights_as_inputs",
]

TARGET_INPUT = "edgefl_target"
LOSS_OUTPUT = "edgefl_loss"
_GRAD_PREFIX = "edgefl_grad__"
_STATE_PREFIX = "edgefl_state__"

#: Model metadata key holding the JSON list of parameter names (written by export_torch).
TRAINABLE_METADATA_KEY = "edgefl.trainable"
#: Model metadata key holding the JSON list of parameters to keep fixed.
FROZEN_METADATA_KEY = "edgefl.frozen"

LOSSES = ("mse", "softmax_cross_entropy", "binary_cross_entropy")

#: Opsets below this are converted up to :data:`_CONVERT_TO` before differentiation.
_MIN_OPSET = 17
_CONVERT_TO = 17

# Differentiable input slots of each supported operator.
_DIFF_SLOTS: dict[str, tuple[int, ...] | None] = {
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "Div": (0, 1),
    "Neg": (0,),
    "Exp": (0,),
    "Log": (0,),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Relu": (0,),
    "LeakyRelu": (0,),
    "Sigmoid": (0,),
    "Tanh": (0,),
    "Softmax": (0,),
    "LogSoftmax": (0,),
    "Flatten": (0,),
    "Reshape": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Transpose": (0,),
    "Concat": None,
    "Identity": (0,),
    "Dropout": (0,),
    "Conv": (0, 1, 2),
    "MaxPool": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "BatchNormalization": (0, 1, 2),
    "Erf": (0,),
    "Sqrt": (0,),
    "Reciprocal": (0,),
    "Pow": (0, 1),
    "Abs": (0,),
    "Clip": (0,),
    "ReduceMean": (0,),
    "ReduceSum": (0,),
    "ReduceMax": (0,),
    "Gather": (0,),
    "Split": (0,),
    "Slice": (0,),
    "Expand": (0,),
    "Where": (1, 2),
    "Cast": (0,),
    "Sum": None,
    "Max": None,
    "Min": None,
}

#: Operators whose gradient rule needs the gradients of every output.
_MULTI_OUTPUT = frozenset({"Split"})

#: Operators the backward pass can differentiate.
SUPPORTED_OPERATORS: frozenset[str] = frozenset(_DIFF_SLOTS)

_FLOAT_TYPES: dict[int, type[np.floating[Any]]] = {
    int(TensorProto.FLOAT): np.float32,
    int(TensorProto.DOUBLE): np.float64,
}


def grad_output_name(weight: str) -> str:
    """Return the training-graph output that carries the gradient of ``weight``."""
    return _GRAD_PREFIX + weight


def state_output_name(name: str) -> str:
    """Return the training-graph output carrying the updated value of state ``name``."""
    return _STATE_PREFIX + name


def _diff_slots(op: str, n_inputs: int) -> tuple[int, ...]:
    slots = _DIFF_SLOTS.get(op, ())
    if slots is None:
        return tuple(range(n_inputs))
    return tuple(s for s in slots if s < n_inputs)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = node.name or f"#{index}"
    first = node.output[0] if node.output else "?"
    return f"node {name!r} ({node.op_type}, output {first!r})"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelError("model imports no default-domain ONNX opset")


Dims = list[int | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphPlan:
    """What the training-graph builder found in an inference model.

    Attributes:
        model: the model after opset conversion and shape inference.
        data_inputs: names of the graph inputs that are not weights.
        output: the model output used for the loss and predictions.
        logits: the tensor the loss is computed on (``output`` or the input of
            a final Softmax / LogSoftmax / Sigmoid).
        output_is_probability: the output is a Sigmoid or Softmax probability.
        loss: the loss name.
        trainable: trainable initializer names, in initializer order.
        frozen: float initializers kept fixed because the caller said so.
        constants: initializers that are not parameters (non-float tensors,
            structural inputs such as running statistics, exporter-marked or
            caller-marked constants).
        state_inputs: non-trained initializers fed as graph inputs (running
            statistics), in this order.
        state_updates: state input -> tensor with its value after a training
            step (the training graph outputs it as ``state_output_name``).
        shapes: static shape of every trainable weight.
        elem_type: the ONNX float element type of the model (FLOAT or DOUBLE).
        target_elem_type: element type of :data:`TARGET_INPUT`.
        target_dims: dims of :data:`TARGET_INPUT` (None where symbolic).
    """

    model: onnx.ModelProto
    data_inputs: tuple[str, ...]
    output: str
    logits: str
    output_is_probability: bool
    loss: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    constants: tuple[str, ...]
    state_inputs: tuple[str, ...]
    state_updates: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    elem_type: int
    target_elem_type: int
    target_dims: tuple[int | None, ...]


def _prepare_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    opset = _default_opset(model)
    if opset < _MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, _CONVERT_TO)
        except Exception as exc:
            raise ModelError(
                f"cannot convert the model from opset {opset} to {_CONVERT_TO}: {exc}"
            ) from exc
    inferred = _infer(model)
    types = _type_table(inferred.graph)
    out_elem = (
        types.get(inferred.graph.output[0].name, (0, None))[0] if inferred.graph.output else 0
    )
    elem = out_elem if out_elem in _FLOAT_TYPES else int(TensorProto.FLOAT)
    rewritten, state = decompose(inferred, {k: v[1] for k, v in types.items()}, elem)
    if rewritten is inferred:
        return inferred, {}
    return _infer(rewritten), state


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ModelError(f"ONNX shape inference failed: {exc}") from exc


def _type_table(graph: onnx.GraphProto) -> dict[str, tuple[int, Dims | None]]:
    table: dict[str, tuple[int, Dims | None]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        dims: Dims | None = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        known = table.get(vi.name)
        if known is not None and dims is None:
            continue  # keep the inferred shape over a declared-without-shape output
        table[vi.name] = (tt.elem_type or (known[0] if known else 0), dims)
    for init in graph.initializer:
        table[init.name] = (init.data_type, [int(d) for d in init.dims])
    return table


def plan_graph(
    model: onnx.ModelProto,
    trainable: Sequence[str] | None = None,
    loss: str = "softmax_cross_entropy",
    *,
    output: str | None = None,
    frozen: Sequence[str] | None = None,
    constants: Sequence[str] | None = None,
    state: Sequence[str] | None = None,
) -> GraphPlan:
    """Check a model and decide what the training graph will look like.

    Args:
        model: an inference model (float32 or float64).
        trainable: initializer names or glob patterns to train; None uses
            the list written by :func:`~edge_sdk.models.export_torch` (model
            metadata :data:`TRAINABLE_METADATA_KEY`) when present, else every
            float initializer that can receive a gradient.
        loss: one of :data:`LOSSES`.
        output: the graph output the loss applies to (default: the first).
        frozen: names or glob patterns of weights to keep fixed.
        constants: names or glob patterns of initializers that are constants
            (not parameters at all, e.g. ``1/sqrt(d)`` stored by an exporter).
        state: initializers to turn into graph inputs although they are not
            trained (running statistics the caller keeps up to date).

    Returns:
        A :class:`GraphPlan`.

    Raises:
        UntrainableWeightError: a weight that is neither frozen nor a constant
            cannot receive a gradient (the message names the weight and the
            operators in the way).
        ModelError: invalid loss, output, dtype or trainable selection.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}. Found {loss!r}")
    prepared, state_updates = _prepare_model(model)
    graph = prepared.graph
    state_names = list(dict.fromkeys([*state_updates, *(state or [])]))
    types = _type_table(graph)
    inits = {t.name: t for t in graph.initializer}
    data_inputs = tuple(vi.name for vi in graph.input if vi.name not in inits)
    outputs = [o.name for o in graph.output]
    if not outputs:
        raise ModelError("model has no outputs")
    out_name = outputs[0] if output is None else output
    if out_name not in outputs:
        raise ModelError(f"model has no output {out_name!r}; outputs: {outputs}")
    elem = types.get(out_name, (0, None))[0]
    if elem not in _FLOAT_TYPES:
        raise ModelError(
            f"output {out_name!r} has element type "
            f"{TensorProto.DataType.Name(elem) if elem else 'unknown'}; "
            "only float32 and float64 models can be trained"
        )

    producer = {o: n for n in graph.node for o in n.output}
    logits = out_name
    is_prob = False
    last = producer.get(out_name)
    if last is not None:
        if loss == "softmax_cross_entropy" and last.op_type in ("Softmax", "LogSoftmax"):
            rank = len(types.get(last.input[0], (0, None))[1] or [])
            axis = int(_attrs(last).get("axis", -1))
            if rank and axis % rank == rank - 1:
                logits = last.input[0]
                is_prob = last.op_type == "Softmax"
        elif loss == "binary_cross_entropy" and last.op_type == "Sigmoid":
            logits = last.input[0]
            is_prob = True

    for node in graph.node:
        # Dropout in training mode would drop at random inside the training
        # step; edgefl trains with inference-mode Dropout only.
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            flag = inits.get(node.input[2])
            if flag is None or bool(numpy_helper.to_array(flag).any()):
                raise ModelError(
                    f"Dropout node {node.name or node.output[0]!r} has a training_mode input "
                    "that is not a constant false; export the model in inference mode"
                )

    roles = _classify(
        graph,
        elem,
        logits,
        trainable=trainable,
        frozen=frozen,
        constants=constants,
        metadata=_metadata_trainable(model),
        metadata_frozen=_metadata_trainable(model, FROZEN_METADATA_KEY) or [],
        state=state_names,
    )
    chosen = list(roles.trainable)
    if not chosen:
        raise ModelError("the model has no trainable weights")
    shapes = {n: tuple(int(d) for d in inits[n].dims) for n in chosen}

    logit_dims = types.get(logits, (0, None))[1]
    if loss == "softmax_cross_entropy":
        if logit_dims is None or len(logit_dims) != 2:
            raise ModelError(
                f"softmax_cross_entropy needs logits of shape (N, C); {logits!r} has "
                f"shape {logit_dims}"
            )
        target_elem = int(TensorProto.INT64)
        target_dims: tuple[int | None, ...] = (logit_dims[0],)
    else:
        if logit_dims is None:
            raise ModelError(f"the shape of {logits!r} is unknown; cannot build {loss}")
        target_elem = elem
        target_dims = tuple(logit_dims)
    return GraphPlan(
        model=prepared,
        data_inputs=data_inputs,
        output=out_name,
        logits=logits,
        output_is_probability=is_prob,
        loss=loss,
        trainable=tuple(chosen),
        frozen=roles.frozen,
        constants=roles.constants,
        state_inputs=tuple(state_names),
        state_updates=state_updates,
        shapes=shapes,
        elem_type=elem,
        target_elem_type=target_elem,
        target_dims=target_dims,
    )


# Input slots that hold structural constants (never parameters) of supported operators.
_CONSTANT_SLOTS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (3, 4),
    "Reshape": (1,),
    "Dropout": (1, 2),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Clip": (1, 2),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "Split": (1,),
    "Expand": (1,),
}


@dataclass(frozen=True, slots=True)
class _Roles:
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    constants: tuple[str, ...]


def _metadata_trainable(
    model: onnx.ModelProto, key: str = TRAINABLE_METADATA_KEY
) -> list[str] | None:
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                names = json.loads(prop.value)
            except ValueError as exc:
                raise ModelError(f"metadata {TRAINABLE_METADATA_KEY!r} is not JSON: {exc}") from exc
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ModelError(f"metadata {TRAINABLE_METADATA_KEY!r} must be a list of names")
            return names
    return None


def _match(patterns: Sequence[str] | None, names: Sequence[str], what: str) -> list[str]:
    """Names matched by ``patterns`` (exact names or globs), in ``names`` order."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a sequence of names, not a string")
    hit: set[str] = set()
    for pattern in patterns:
        found = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise ModelError(f"{what} entry {pattern!r} matches no initializer of the model")
        hit.update(found)
    return [n for n in names if n in hit]


def _weight_paths(
    graph: onnx.GraphProto, elem: int, logits: str, types: dict[str, tuple[int, Dims | None]]
) -> tuple[dict[str, list[str]], set[str], set[str]]:
    """Trace every float initializer towards the loss.

    Returns:
        (blockers, reaching, structural): per initializer the nodes on a path
        to the loss that no gradient can cross; initializers that reach the
        loss through differentiable inputs only; initializers used only in
        structural-constant slots.
    """
    to_loss: set[str] = {logits}
    for node in reversed(graph.node):
        if any(o in to_loss for o in node.output):
            to_loss.update(i for i in node.input if i)
    floats = [t.name for t in graph.initializer if t.data_type == elem]
    blockers: dict[str, list[str]] = {}
    reaching: set[str] = set()
    structural: set[str] = set()
    for w in floats:
        direct = [
            (node, s) for node in graph.node for s, name in enumerate(node.input) if name == w
        ]
        if direct and all(
            node.domain in ("", "ai.onnx")
            and node.op_type in SUPPORTED_OPERATORS
            and s in _constant_slots(node)
            for node, s in direct
        ):
            structural.add(w)
            continue
        deps = {w}
        found: list[str] = []
        for index, node in enumerate(graph.node):
            slots = [s for s, name in enumerate(node.input) if name and name in deps]
            if not slots:
                continue
            float_out = [o for o in node.output if o and types.get(o, (0, None))[0] in _FLOAT_TYPES]
            if not float_out:
                continue  # integer results (Shape, ArgMax...) carry no gradient
            supported = node.domain in ("", "ai.onnx") and node.op_type in SUPPORTED_OPERATORS
            diff = set(_diff_slots(node.op_type, len(node.input))) if supported else set()
            const = set(_constant_slots(node)) if supported else set()
            if all(s in diff or s in const for s in slots):
                if any(s in diff for s in slots):
                    deps.update(float_out)
            elif any(o in to_loss for o in node.output):
                why = "" if supported else f" [operator {node.op_type!r} is not differentiable]"
                found.append(_node_label(node, index) + why)
        if found:
            blockers[w] = found
        elif logits in deps:
            reaching.add(w)
    return blockers, reaching, structural


def _constant_slots(node: onnx.NodeProto) -> tuple[int, ...]:
    return _CONSTANT_SLOTS.get(node.op_type, ())


def _bn_training(node: onnx.NodeProto) -> bool:
    return bool(int(_attrs(node).get("training_mode", 0)))


def _classify(
    graph: onnx.GraphProto,
    elem: int,
    logits: str,
    *,
    trainable: Sequence[str] | None,
    frozen: Sequence[str] | None,
    constants: Sequence[str] | None,
    metadata: list[str] | None,
    metadata_frozen: Sequence[str] = (),
    state: Sequence[str] = (),
) -> _Roles:
    """Give every initializer one role: trainable, frozen or constant."""
    types = _type_table(graph)
    names = [t.name for t in graph.initializer]
    floats = [t.name for t in graph.initializer if t.data_type == elem]
    blockers, _reaching, structural = _weight_paths(graph, elem, logits, types)
    differentiable_use: set[str] = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPERATORS:
            continue
        for slot in _diff_slots(node.op_type, len(node.input)):
            differentiable_use.add(node.input[slot])
    capable = [
        n for n in floats if n in differentiable_use and n not in blockers and n not in structural
    ]
    marked_const = set(_match(constants, names, "constants"))
    marked_frozen = set(_match(frozen, names, "frozen"))
    marked_const |= set(state)
    both = marked_const & marked_frozen
    if both:
        raise ModelError(f"initializers {sorted(both)} are listed as both frozen and constant")
    if metadata is not None:
        unknown = [n for n in metadata if n not in names]
        if unknown:
            raise ModelError(
                f"metadata {TRAINABLE_METADATA_KEY!r} names {unknown}, which are not "
                "initializers of the model"
            )
        params = set(metadata) | set(metadata_frozen)
        marked_const |= {n for n in names if n not in params}
        if trainable is None:
            marked_frozen |= {n for n in metadata_frozen if n in names}
    if trainable is not None:
        requested = set(_match(trainable, names, "trainable"))
    elif metadata is not None:
        requested = set(metadata) - marked_frozen - set(_match(constants, names, "constants"))
    else:
        requested = None
    if requested is not None:
        clash = requested & (marked_frozen | set(_match(constants, names, "constants")))
        if clash:
            raise ModelError(f"initializers {sorted(clash)} are listed as trainable and fixed")
        ordered = sorted(requested, key=names.index)
        blocked = {name: blockers[name] for name in ordered if name in blockers}
        if blocked:
            raise _untrainable(blocked)
        for name in ordered:
            if name not in capable:
                raise ModelError(
                    f"initializer {name!r} cannot be trained: it is not a "
                    f"{TensorProto.DataType.Name(elem)} tensor feeding a differentiable input"
                )
        chosen = [n for n in floats if n in requested]
    else:
        chosen = [n for n in capable if n not in marked_const and n not in marked_frozen]
        fixed_marks = marked_const | marked_frozen
        bad = {n: blockers[n] for n in floats if n in blockers and n not in fixed_marks}
        if bad:
            raise _untrainable(bad)
    chosen_set = set(chosen)
    fixed = [n for n in names if n not in chosen_set]
    frozen_names = tuple(
        n
        for n in fixed
        if n in marked_frozen
        or (n not in marked_const and n in floats and (n in capable or n in blockers))
    )
    frozen_set = set(frozen_names)
    return _Roles(
        trainable=tuple(chosen),
        frozen=frozen_names,
        constants=tuple(n for n in fixed if n not in frozen_set),
    )


def _untrainable(blocked: dict[str, list[str]]) -> UntrainableWeightError:
    lines = [
        f"weight {w!r} cannot receive a gradient: " + "; ".join(nodes)
        for w, nodes in blocked.items()
    ]
    names = list(blocked)
    return UntrainableWeightError(
        "\n".join(lines)
        + f"\nPass frozen={names!r} to keep them fixed (or constants= if they are not "
        "parameters), or replace the operators; supported: "
        + ", ".join(sorted(SUPPORTED_OPERATORS)),
        blocked=blocked,
    )


class _Builder:
    """Emits new nodes and constants with collision-free names."""

    def __init__(self, taken: set[str], elem: int) -> None:
        self.taken = taken
        self.elem = elem
        self.np_dtype = _FLOAT_TYPES[elem]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}
        self._shapes: dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"edgefl/{hint}/{self._count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.fresh("node"), **attrs)
        )
        return outs

    def op1(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]

    def _const(self, key: tuple[Any, ...], array: np.ndarray[Any, Any]) -> str:
        if key not in self._consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def f(self, value: float) -> str:
        """A float scalar constant of the model's dtype."""
        return self._const(("f", float(value)), np.array(value, dtype=self.np_dtype))

    def farray(self, array: np.ndarray[Any, Any]) -> str:
        """A float array constant of the model's dtype (not cached)."""
        name = self.fresh("const")
        self.inits.append(numpy_helper.from_array(array.astype(self.np_dtype), name))
        return name

    def i64(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant."""
        vals = tuple(int(v) for v in values)
        return self._const(("i", vals), np.array(vals, dtype=np.int64))

    def shape(self, x: str) -> str:
        if x not in self._shapes:
            self._shapes[x] = self.op1("Shape", [x])
        return self._shapes[x]

    def cast_float(self, x: str) -> str:
        return self.op1("Cast", [x], to=self.elem)


class _Differentiator:
    """Builds the loss head and the backward pass for one :class:`GraphPlan`."""

    def __init__(self, plan: GraphPlan) -> None:
        self.plan = plan
        graph = plan.model.graph
        self.types = _type_table(graph)
        taken = {n for node in graph.node for n in [*node.input, *node.output]}
        taken |= {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
        taken |= {t.name for t in graph.initializer}
        taken |= {node.name for node in graph.node}
        self.b = _Builder(taken, plan.elem_type)
        self.label = ""
        self.grads_out: list[str | None] = []
        self.opset = _default_opset(plan.model)
        self.consts: dict[str, np.ndarray[Any, Any]] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer
        }
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)

    # -- shape helpers ---------------------------------------------------
    def dims(self, name: str) -> Dims:
        entry = self.types.get(name)
        if entry is None or entry[1] is None:
            raise ModelError(
                f"the shape of tensor {name!r} is unknown (needed for the gradient of "
                f"{self.label}); give the model static input ranks"
            )
        return entry[1]

    def static_dims(self, name: str, what: str) -> list[int]:
        """Dims of ``name`` with every axis but the first (batch) static; batch -> -1."""
        dims = self.dims(name)
        if any(d is None for d in dims[1:]):
            raise ModelError(
                f"{what} of {self.label} needs a static shape (except the batch axis) "
                f"for {name!r}, got {dims}"
            )
        return [-1 if d is None else int(d) for d in dims]

    def reduce_to(self, g: str, g_dims: Dims, target: str) -> str:
        """Sum a broadcast gradient back to the shape of ``target``."""
        t_dims = self.dims(target)
        lead = len(g_dims) - len(t_dims)
        if lead < 0:
            raise ModelError(f"unexpected broadcast in {self.label}")
        axes = list(range(lead))
        for i, d in enumerate(t_dims):
            if d == 1 and g_dims[lead + i] != 1:
                axes.append(lead + i)
        if not axes:
            return g
        summed = self.b.op1("ReduceSum", [g, self.b.i64(axes)], keepdims=1)
        return self.b.op1("Reshape", [summed, self.b.shape(target)])

    # -- loss head -------------------------------------------------------
    def loss_head(self, with_grad: bool = True) -> tuple[str, str | None]:
        """Emit the loss; return (loss name, gradient of the logits or None)."""
        b = self.b
        z = self.plan.logits
        t = TARGET_INPUT
        if self.plan.loss == "softmax_cross_entropy":
            logp = b.op1("LogSoftmax", [z], axis=1)
            labels = b.op1("Unsqueeze", [t, b.i64([1])])
            picked = b.op1("GatherElements", [logp, labels], axis=1)
            total = b.op1("ReduceSum", [picked], keepdims=0)
            zshape = b.shape(z)
            n = b.cast_float(b.op1("Gather", [zshape, b.i64([0])]))
            n_scalar = b.op1("Reshape", [n, b.i64([])])
            loss = b.op1("Neg", [b.op1("Div", [total, n_scalar])])
            if not with_grad:
                return loss, None
            n_classes = b.op1("Gather", [zshape, b.i64([1])])
            classes = b.op1(
                "Range",
                [
                    b.op1("Reshape", [b.i64([0]), b.i64([])]),
                    b.op1("Reshape", [n_classes, b.i64([])]),
                    b.op1("Reshape", [b.i64([1]), b.i64([])]),
                ],
            )
            onehot = b.cast_float(b.op1("Equal", [labels, classes]))
            dz = b.op1("Div", [b.op1("Sub", [b.op1("Exp", [logp]), onehot]), n_scalar])
            return loss, dz
        numel = b.cast_float(b.op1("Size", [z]))
        if self.plan.loss == "mse":
            diff = b.op1("Sub", [z, t])
            total = b.op1("ReduceSum", [b.op1("Mul", [diff, diff])], keepdims=0)
            loss = b.op1("Div", [total, numel])
            if not with_grad:
                return loss, None
            dz = b.op1("Mul", [diff, b.op1("Div", [b.f(2.0), numel])])
            return loss, dz
        # binary cross-entropy on logits: relu(z) - z*y + log(1 + exp(-|z|))
        softplus = b.op1(
            "Log", [b.op1("Add", [b.f(1.0), b.op1("Exp", [b.op1("Neg", [b.op1("Abs", [z])])])])]
        )
        per = b.op1("Add", [b.op1("Sub", [b.op1("Relu", [z]), b.op1("Mul", [z, t])]), softplus])
        loss = b.op1("Div", [b.op1("ReduceSum", [per], keepdims=0), numel])
        if not with_grad:
            return loss, None
        dz = b.op1("Div", [b.op1("Sub", [b.op1("Sigmoid", [z]), t]), numel])
        return loss, dz

    # -- backward ----------------------------------------------------------
    def backward(
        self, nodes: Sequence[onnx.NodeProto], seed_name: str, seed_grad: str
    ) -> dict[str, str]:
        requires: set[str] = set(self.plan.trainable)
        for node in nodes:
            if any(i in requires for i in node.input if i):
                for o in node.output:
                    if o and self.types.get(o, (0, None))[0] in _FLOAT_TYPES:
                        requires.add(o)
        pending: dict[str, list[str]] = {seed_name: [seed_grad]}
        for index in range(len(nodes) - 1, -1, -1):
            node = nodes[index]
            if not any(o in pending for o in node.output):
                continue
            grads_out = [self._total(pending.pop(o)) if o in pending else None for o in node.output]
            self.grads_out = grads_out
            if grads_out[0] is None and node.op_type not in _MULTI_OUTPUT:
                continue  # only a secondary output (e.g. a Dropout mask) is used
            wanted = [bool(name) and name in requires for name in node.input]
            if not any(wanted):
                continue
            self.label = _node_label(node, index)
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPERATORS:
                raise UnsupportedOperatorError(
                    f"{self.label} is on the gradient path but operator "
                    f"{node.op_type!r}{' of domain ' + repr(node.domain) if node.domain else ''}"
                    f" is not differentiable; supported: {', '.join(sorted(SUPPORTED_OPERATORS))}"
                )
            slots = set(_diff_slots(node.op_type, len(node.input)))
            for slot, name in enumerate(node.input):
                if wanted[slot] and slot not in slots:
                    raise UnsupportedOperatorError(
                        f"{self.label}: input {slot} ({name!r}) depends on trainable weights "
                        "but is not differentiable"
                    )
            rule = getattr(self, f"_grad_{node.op_type}")
            grad_y = grads_out[0] if grads_out[0] is not None else ""
            grads_in: list[str | None] = rule(node, grad_y, wanted)
            for slot, g in enumerate(grads_in):
                if g is not None and wanted[slot]:
                    pending.setdefault(node.input[slot], []).append(g)
        return {name: self._total(pending[name]) for name in self.plan.trainable if name in pending}

    def _total(self, grads: list[str]) -> str:
        if len(grads) == 1:
            return grads[0]
        return self.b.op1("Sum", grads)

    # Each rule receives the node, the gradient of its first output and which
    # inputs need a gradient; it returns one gradient name (or None) per input.
    def _grad_Identity(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [g] + [None] * (len(node.input) - 1)

    _grad_Dropout = _grad_Identity

    def _grad_Neg(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [self.b.op1("Neg", [g])]

    def _grad_Exp(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [self.b.op1("Mul", [g, node.output[0]])]

    def _grad_Log(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [self.b.op1("Div", [g, node.input[0]])]

    def _binary(
        self, node: onnx.NodeProto, ga: str | None, gb: str | None, want: list[bool]
    ) -> list[str | None]:
        out_dims = self.dims(node.output[0])
        a, bname = node.input[0], node.input[1]
        return [
            self.reduce_to(ga, out_dims, a) if want[0] and ga is not None else None,
            self.reduce_to(gb, out_dims, bname) if want[1] and gb is not None else None,
        ]

    def _grad_Add(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return self._binary(node, g, g, want)

    def _grad_Sub(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        gb = self.b.op1("Neg", [g]) if want[1] else None
        return self._binary(node, g, gb, want)

    def _grad_Mul(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        a, bname = node.input[0], node.input[1]
        ga = self.b.op1("Mul", [g, bname]) if want[0] else None
        gb = self.b.op1("Mul", [g, a]) if want[1] else None
        return self._binary(node, ga, gb, want)

    def _grad_Div(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        bname, y = node.input[1], node.output[0]
        ga = self.b.op1("Div", [g, bname]) if want[0] else None
        gb = (
            self.b.op1("Neg", [self.b.op1("Div", [self.b.op1("Mul", [g, y]), bname])])
            if want[1]
            else None
        )
        return self._binary(node, ga, gb, want)

    def _grad_Relu(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        positive = b.op1("Greater", [node.input[0], b.f(0.0)])
        return [b.op1("Where", [positive, g, b.f(0.0)])]

    def _grad_LeakyRelu(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        alpha = float(_attrs(node).get("alpha", 0.01))
        positive = b.op1("Greater", [node.input[0], b.f(0.0)])
        return [b.op1("Where", [positive, g, b.op1("Mul", [g, b.f(alpha)])])]

    def _grad_Sigmoid(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        y = node.output[0]
        return [b.op1("Mul", [g, b.op1("Mul", [y, b.op1("Sub", [b.f(1.0), y])])])]

    def _grad_Tanh(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        y = node.output[0]
        return [b.op1("Mul", [g, b.op1("Sub", [b.f(1.0), b.op1("Mul", [y, y])])])]

    def _grad_Softmax(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        axis = int(_attrs(node).get("axis", -1))
        y = node.output[0]
        dot = b.op1("ReduceSum", [b.op1("Mul", [g, y]), b.i64([axis])], keepdims=1)
        return [b.op1("Mul", [y, b.op1("Sub", [g, dot])])]

    def _grad_LogSoftmax(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        axis = int(_attrs(node).get("axis", -1))
        total = b.op1("ReduceSum", [g, b.i64([axis])], keepdims=1)
        return [b.op1("Sub", [g, b.op1("Mul", [b.op1("Exp", [node.output[0]]), total])])]

    def _grad_reshape_like(
        self, node: onnx.NodeProto, g: str, want: list[bool]
    ) -> list[str | None]:
        x = node.input[0]
        return [self.b.op1("Reshape", [g, self.b.shape(x)])] + [None] * (len(node.input) - 1)

    _grad_Flatten = _grad_reshape_like
    _grad_Reshape = _grad_reshape_like
    _grad_Squeeze = _grad_reshape_like
    _grad_Unsqueeze = _grad_reshape_like

    def _grad_Transpose(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        perm = _attrs(node).get("perm")
        if perm is None:
            perm = list(range(len(self.dims(node.input[0]))))[::-1]
        inverse = [int(i) for i in np.argsort(np.asarray(perm))]
        return [self.b.op1("Transpose", [g], perm=inverse)]

    def _grad_Concat(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        axis = int(_attrs(node)["axis"])
        sizes = [b.op1("Gather", [b.shape(x), b.i64([axis])]) for x in node.input]
        split_sizes = b.op1("Concat", sizes, axis=0)
        parts = b.op("Split", [g, split_sizes], n_out=len(node.input), axis=axis)
        return [p if w else None for p, w in zip(parts, want, strict=True)]

    def _grad_Gemm(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        at = _attrs(node)
        alpha = float(at.get("alpha", 1.0))
        beta = float(at.get("beta", 1.0))
        ta = int(at.get("transA", 0))
        tb = int(at.get("transB", 0))
        a, bm = node.input[0], node.input[1]
        out: list[str | None] = [None] * len(node.input)
        if want[0]:
            if ta == 0:
                out[0] = b.op1("Gemm", [g, bm], alpha=alpha, transB=1 - tb)
            else:
                out[0] = b.op1("Gemm", [bm, g], alpha=alpha, transA=tb, transB=1)
        if want[1]:
            if tb == 0:
                out[1] = b.op1("Gemm", [a, g], alpha=alpha, transA=1 - ta)
            else:
                out[1] = b.op1("Gemm", [g, a], alpha=alpha, transA=1, transB=ta)
        if len(node.input) > 2 and node.input[2] and want[2]:
            gc = g if beta == 1.0 else b.op1("Mul", [g, b.f(beta)])
            out[2] = self.reduce_to(gc, self.dims(node.output[0]), node.input[2])
        return out

    def _swap_last(self, x: str, rank: int) -> str:
        perm = [*range(rank - 2), rank - 1, rank - 2]
        return self.b.op1("Transpose", [x], perm=perm)

    def _grad_MatMul(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        a, bm = node.input
        a_dims, b_dims, y_dims = self.dims(a), self.dims(bm), self.dims(node.output[0])
        if len(a_dims) < 2 or len(b_dims) < 2:
            raise UnsupportedOperatorError(
                f"{self.label}: MatMul with a 1-D operand is not differentiable here; "
                "reshape it to 2-D"
            )
        out: list[str | None] = [None, None]
        if want[0]:
            ga = self.b.op1("MatMul", [g, self._swap_last(bm, len(b_dims))])
            out[0] = self.reduce_to(ga, [*y_dims[:-2], *a_dims[-2:]], a)
        if want[1]:
            gb = self.b.op1("MatMul", [self._swap_last(a, len(a_dims)), g])
            out[1] = self.reduce_to(gb, [*y_dims[:-2], *b_dims[-2:]], bm)
        return out

    # -- convolution and pooling -------------------------------------------
    def _window(
        self, node: onnx.NodeProto, x: str, kernel: list[int]
    ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """Return (spatial in, strides, dilations, pads, output paddings) with explicit pads."""
        at = _attrs(node)
        spatial = self.static_dims(x, node.op_type)[2:]
        k = len(spatial)
        strides = [int(s) for s in at.get("strides", [1] * k)]
        dilations = [int(d) for d in at.get("dilations", [1] * k)]
        auto_pad = at.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("NOTSET", ""):
            pads = [int(p) for p in at.get("pads", [0] * (2 * k))]
        elif auto_pad == "VALID":
            pads = [0] * (2 * k)
        else:
            begin, end = [], []
            for size, s, d, kk in zip(spatial, strides, dilations, kernel, strict=True):
                out = -(-size // s)
                total = max(0, (out - 1) * s + (kk - 1) * d + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else large)
                end.append(large if auto_pad == "SAME_UPPER" else small)
            pads = begin + end
        out_pad = []
        for i in range(k):
            span = spatial[i] + pads[i] + pads[i + k] - dilations[i] * (kernel[i] - 1) - 1
            out_pad.append(span % strides[i])
        return spatial, strides, dilations, pads, out_pad

    def _grad_Conv(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        x, w = node.input[0], node.input[1]
        w_dims = self.static_dims(w, "Conv weight")
        kernel = w_dims[2:]
        group = int(_attrs(node).get("group", 1))
        spatial, strides, dilations, pads, out_pad = self._window(node, x, kernel)
        k = len(spatial)
        out: list[str | None] = [None] * len(node.input)
        if want[0]:
            out[0] = b.op1(
                "ConvTranspose",
                [g, w],
                strides=strides,
                pads=pads,
                dilations=dilations,
                group=group,
                output_padding=out_pad,
            )
        if want[1]:
            if group == 1:
                xt = b.op1("Transpose", [x], perm=[1, 0, *range(2, k + 2)])
            else:
                cg = self.static_dims(x, "Conv input")[1] // group
                split = b.op1("Reshape", [x, b.i64([-1, group, cg, *spatial])])
                moved = b.op1("Transpose", [split], perm=[2, 1, 0, *range(3, k + 3)])
                xt = b.op1("Reshape", [moved, b.i64([cg, -1, *spatial])])
            gt = b.op1("Transpose", [g], perm=[1, 0, *range(2, k + 2)])
            corr = b.op1(
                "Conv", [xt, gt], strides=dilations, dilations=strides, pads=pads, group=group
            )
            y_dims = self.static_dims(node.output[0], "Conv output")[2:]
            full = [
                (spatial[i] + pads[i] + pads[i + k] - strides[i] * (y_dims[i] - 1) - 1)
                // dilations[i]
                + 1
                for i in range(k)
            ]
            if full != kernel:
                corr = b.op1(
                    "Slice",
                    [corr, b.i64([0] * k), b.i64(kernel), b.i64(list(range(2, k + 2)))],
                )
            out[1] = b.op1("Transpose", [corr], perm=[1, 0, *range(2, k + 2)])
        if len(node.input) > 2 and node.input[2] and want[2]:
            out[2] = b.op1("ReduceSum", [g, b.i64([0, *range(2, k + 2)])], keepdims=0)
        return out

    def _grad_MaxPool(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        if int(_attrs(node).get("storage_order", 0)) != 0:
            raise UnsupportedOperatorError(f"{self.label}: MaxPool with storage_order=1")
        if len(node.output) < 2 or not node.output[1]:
            raise ModelError(f"{self.label}: internal error, MaxPool indices missing")
        x = node.input[0]
        size = b.op1("Reshape", [b.op1("Size", [x]), b.i64([1])])
        zeros = b.op1(
            "ConstantOfShape",
            [size],
            value=numpy_helper.from_array(np.zeros(1, dtype=b.np_dtype)),
        )
        idx = b.op1("Reshape", [node.output[1], b.i64([-1])])
        flat_g = b.op1("Reshape", [g, b.i64([-1])])
        scattered = b.op1("ScatterElements", [zeros, idx, flat_g], axis=0, reduction="add")
        return [b.op1("Reshape", [scattered, b.shape(x)])]

    def _grad_AveragePool(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        at = _attrs(node)
        x = node.input[0]
        kernel = [int(v) for v in at["kernel_shape"]]
        _, strides, dilations, pads, out_pad = self._window(node, x, kernel)
        if int(at.get("ceil_mode", 0)) and any(out_pad):
            raise UnsupportedOperatorError(
                f"{self.label}: AveragePool with ceil_mode=1 and partial windows"
            )
        channels = self.static_dims(x, "AveragePool")[1]
        count = math.prod(kernel)
        include_pad = int(at.get("count_include_pad", 0)) == 1 or not any(pads)
        if include_pad:
            scaled = g
            weight = b.farray(np.full((channels, 1, *kernel), 1.0 / count))
        else:
            ones = b.op1(
                "ConstantOfShape",
                [b.shape(x)],
                value=numpy_helper.from_array(np.ones(1, dtype=b.np_dtype)),
            )
            frac = b.op1(
                "AveragePool",
                [ones],
                kernel_shape=kernel,
                strides=strides,
                pads=pads,
                count_include_pad=1,
                **({"dilations": dilations} if any(d != 1 for d in dilations) else {}),
            )
            valid = b.op1("Mul", [frac, b.f(float(count))])
            scaled = b.op1("Div", [g, valid])
            weight = b.farray(np.ones((channels, 1, *kernel)))
        return [
            b.op1(
                "ConvTranspose",
                [scaled, weight],
                strides=strides,
                pads=pads,
                dilations=dilations,
                group=channels,
                output_padding=out_pad,
            )
        ]

    def _grad_GlobalAveragePool(
        self, node: onnx.NodeProto, g: str, want: list[bool]
    ) -> list[str | None]:
        b = self.b
        x = node.input[0]
        ratio = b.op1(
            "Div",
            [b.cast_float(b.op1("Size", [g])), b.cast_float(b.op1("Size", [x]))],
        )
        return [b.op1("Mul", [b.op1("Expand", [g, b.shape(x)]), ratio])]

    # -- elementwise math added for exported PyTorch models ------------------
    def _grad_Erf(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        x = node.input[0]
        bell = b.op1("Exp", [b.op1("Neg", [b.op1("Mul", [x, x])])])
        return [b.op1("Mul", [g, b.op1("Mul", [bell, b.f(2.0 / math.sqrt(math.pi))])])]

    def _grad_Sqrt(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        return [b.op1("Div", [g, b.op1("Mul", [node.output[0], b.f(2.0)])])]

    def _grad_Reciprocal(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        y = node.output[0]
        return [b.op1("Neg", [b.op1("Mul", [g, b.op1("Mul", [y, y])])])]

    def _grad_Abs(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [self.b.op1("Mul", [g, self.b.op1("Sign", [node.input[0]])])]

    def _grad_Pow(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        x, p = node.input[0], node.input[1]
        y = node.output[0]
        if self.types.get(p, (0, None))[0] != self.plan.elem_type:
            p = b.cast_float(p)
        ga = gb = None
        if want[0]:
            lower = b.op1("Pow", [x, b.op1("Sub", [p, b.f(1.0)])])
            ga = b.op1("Mul", [g, b.op1("Mul", [p, lower])])
        if want[1]:
            gb = b.op1("Mul", [g, b.op1("Mul", [y, b.op1("Log", [x])])])
        return self._binary(node, ga, gb, want)

    def _grad_Cast(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        src = self.types.get(node.input[0], (0, None))[0]
        if src not in _FLOAT_TYPES:
            return [None]
        return [self.b.op1("Cast", [g], to=src)]

    def _grad_Clip(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        x = node.input[0]
        inside: str | None = None
        bounds = [(1, "Greater"), (2, "Less")]
        for slot, op in bounds:
            if len(node.input) > slot and node.input[slot]:
                test = b.op1(op, [x, node.input[slot]])
                inside = test if inside is None else b.op1("And", [inside, test])
        if inside is None:
            return [g, None, None][: len(node.input)]
        return [b.op1("Where", [inside, g, b.f(0.0)])] + [None] * (len(node.input) - 1)

    def _grad_Where(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        cond = node.input[0]
        out_dims = self.dims(node.output[0])
        out: list[str | None] = [None, None, None]
        if want[1]:
            out[1] = self.reduce_to(b.op1("Where", [cond, g, b.f(0.0)]), out_dims, node.input[1])
        if want[2]:
            out[2] = self.reduce_to(b.op1("Where", [cond, b.f(0.0), g]), out_dims, node.input[2])
        return out

    def _grad_Expand(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [self.reduce_to(g, self.dims(node.output[0]), node.input[0]), None]

    def _grad_Sum(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        out_dims = self.dims(node.output[0])
        return [
            self.reduce_to(g, out_dims, x) if w else None
            for x, w in zip(node.input, want, strict=True)
        ]

    def _grad_minmax(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        y = node.output[0]
        out_dims = self.dims(y)
        hits = [b.cast_float(b.op1("Equal", [x, y])) for x in node.input]
        count = hits[0] if len(hits) == 1 else b.op1("Sum", hits)
        share = b.op1("Div", [g, count])  # ties share the gradient, like PyTorch
        return [
            self.reduce_to(b.op1("Mul", [share, h]), out_dims, x) if w else None
            for x, h, w in zip(node.input, hits, want, strict=True)
        ]

    _grad_Max = _grad_minmax
    _grad_Min = _grad_minmax

    # -- reductions ------------------------------------------------------------
    def _const_ints(self, name: str, what: str) -> list[int]:
        value = self.consts.get(name)
        if value is None:
            raise UnsupportedOperatorError(f"{self.label}: {what} must be a constant")
        return [int(v) for v in np.asarray(value).reshape(-1)]

    def _reduce_axes(self, node: onnx.NodeProto, rank: int) -> list[int]:
        at = _attrs(node)
        axes: list[int] | None = None
        if "axes" in at:
            axes = [int(a) for a in at["axes"]]
        elif len(node.input) > 1 and node.input[1]:
            axes = self._const_ints(node.input[1], "axes")
        if not axes:
            if int(at.get("noop_with_empty_axes", 0)):
                return []
            return list(range(rank))
        return sorted(a % rank for a in axes)

    def _reduce_back(self, node: onnx.NodeProto, g: str) -> tuple[str, str]:
        """Return (gradient broadcast to the input shape, kept-dims output)."""
        b = self.b
        x, y = node.input[0], node.output[0]
        rank = len(self.dims(x))
        axes = self._reduce_axes(node, rank)
        keep = int(_attrs(node).get("keepdims", 1))
        gk, yk = g, y
        if not keep and axes:
            gk = b.op1("Unsqueeze", [g, b.i64(axes)])
            yk = b.op1("Unsqueeze", [y, b.i64(axes)])
        return b.op1("Expand", [gk, b.shape(x)]), yk

    def _grad_ReduceSum(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        return [self._reduce_back(node, g)[0]] + [None] * (len(node.input) - 1)

    def _grad_ReduceMean(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        spread, _ = self._reduce_back(node, g)
        ratio = b.op1(
            "Div",
            [
                b.cast_float(b.op1("Size", [node.output[0]])),
                b.cast_float(b.op1("Size", [node.input[0]])),
            ],
        )
        return [b.op1("Mul", [spread, ratio])] + [None] * (len(node.input) - 1)

    def _grad_ReduceMax(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        x = node.input[0]
        spread, yk = self._reduce_back(node, g)
        hits = b.cast_float(b.op1("Equal", [x, yk]))
        rank = len(self.dims(x))
        axes = self._reduce_axes(node, rank)
        count = b.op1("ReduceSum", [hits, b.i64(axes)], keepdims=1) if axes else hits
        share = b.op1("Div", [hits, count])  # ties share the gradient, like torch.amax
        return [b.op1("Mul", [spread, share])] + [None] * (len(node.input) - 1)

    # -- indexing ----------------------------------------------------------------
    def _scatter_flat(self, x: str, index_of_out: str, g: str) -> str:
        """Scatter-add ``g`` into zeros shaped like ``x`` at flat positions ``index_of_out``."""
        b = self.b
        size = b.op1("Reshape", [b.op1("Size", [x]), b.i64([1])])
        zeros = b.op1(
            "ConstantOfShape", [size], value=numpy_helper.from_array(np.zeros(1, dtype=b.np_dtype))
        )
        idx = b.op1("Reshape", [index_of_out, b.i64([-1])])
        flat_g = b.op1("Reshape", [g, b.i64([-1])])
        scattered = b.op1("ScatterElements", [zeros, idx, flat_g], axis=0, reduction="add")
        return b.op1("Reshape", [scattered, b.shape(x)])

    def _positions(self, x: str) -> str:
        """An int64 tensor shaped like ``x`` holding each element's flat index."""
        b = self.b
        n = b.op1("Reshape", [b.op1("Size", [x]), b.i64([])])
        zero = b.op1("Reshape", [b.i64([0]), b.i64([])])
        one = b.op1("Reshape", [b.i64([1]), b.i64([])])
        return b.op1("Reshape", [b.op1("Range", [zero, n, one]), b.shape(x)])

    def _grad_Gather(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        x = node.input[0]
        axis = int(_attrs(node).get("axis", 0))
        picked = b.op1("Gather", [self._positions(x), node.input[1]], axis=axis)
        return [self._scatter_flat(x, picked, g), None]

    def _grad_Slice(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        x = node.input[0]
        picked = self.b.op1("Slice", [self._positions(x), *node.input[1:]])
        return [self._scatter_flat(x, picked, g)] + [None] * (len(node.input) - 1)

    def _grad_Split(self, node: onnx.NodeProto, g: str, want: list[bool]) -> list[str | None]:
        b = self.b
        axis = int(_attrs(node).get("axis", 0))
        parts: list[str] = []
        for out, grad in zip(node.output, self.grads_out, strict=True):
            if grad is None:
                grad = b.op1(
                    "ConstantOfShape",
                    [b.shape(out)],
                    value=numpy_helper.from_array(np.zeros(1, dtype=b.np_dtype)),
                )
            parts.append(grad)
        return [b.op1("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)

    def _grad_BatchNormalization(
        self, node: onnx.NodeProto, g: str, want: list[bool]
    ) -> list[str | None]:
        b = self.b
        at = _attrs(node)
        if int(at.get("training_mode", 0)):
            raise UnsupportedOperatorError(
                f"{self.label}: BatchNormalization with training_mode=1 (only frozen statistics)"
            )
        x, scale, _bias, mean, var = node.input[:5]
        rank = len(self.dims(x))
        eps = float(at.get("epsilon", 1e-5))
        inv_std = b.op1("Reciprocal", [b.op1("Sqrt", [b.op1("Add", [var, b.f(eps)])])])
        extra = list(range(1, rank - 1))

        def per_channel(v: str) -> str:
            return b.op1("Unsqueeze", [v, b.i64(extra)]) if extra else v

        out: list[str | None] = [None] * len(node.input)
        axes = b.i64([0, *range(2, rank)])
        if want[0]:
            out[0] = b.op1("Mul", [g, per_channel(b.op1("Mul", [scale, inv_std]))])
        if want[1]:
            centred = b.op1("Sub", [x, per_channel(mean)])
            xhat = b.op1("Mul", [centred, per_channel(inv_std)])
            out[1] = b.op1("ReduceSum", [b.op1("Mul", [g, xhat]), axes], keepdims=0)
        if want[2]:
            out[2] = b.op1("ReduceSum", [g, axes], keepdims=0)
        return out


def _forward_nodes(plan: GraphPlan, with_indices: bool) -> list[onnx.NodeProto]:
    """Copy the forward nodes; MaxPool nodes get an indices output for the backward pass."""
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(plan.model.graph.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if (
            with_indices
            and node.op_type == "MaxPool"
            and (len(node.output) < 2 or not node.output[1])
        ):
            if len(copy.output) < 2:
                copy.output.append(f"edgefl/maxpool_indices/{i}")
            else:
                copy.output[1] = f"edgefl/maxpool_indices/{i}"
        nodes.append(copy)
    return nodes


def _assemble(
    plan: GraphPlan,
    nodes: Sequence[onnx.NodeProto],
    extra_inits: Sequence[onnx.TensorProto],
    outputs: Sequence[onnx.ValueInfoProto],
    *,
    with_target: bool,
    name: str,
) -> onnx.ModelProto:
    graph = plan.model.graph
    trainable = set(plan.trainable)
    inputs = [vi for vi in graph.input if vi.name in plan.data_inputs]
    if with_target:
        inputs.append(
            helper.make_tensor_value_info(
                TARGET_INPUT,
                plan.target_elem_type,
                [d if d is not None else "N" for d in plan.target_dims],
            )
        )
    for w in plan.trainable:
        inputs.append(helper.make_tensor_value_info(w, plan.elem_type, list(plan.shapes[w])))
    init_by_name = {t.name: t for t in graph.initializer}
    for name in plan.state_inputs:
        t = init_by_name[name]
        inputs.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    # State inputs keep their initializer as a default value (an overridable input).
    inits = [t for t in graph.initializer if t.name not in trainable]
    new_graph = helper.make_graph(
        list(nodes), name, inputs, list(outputs), initializer=[*inits, *extra_inits]
    )
    new_graph.sparse_initializer.extend(graph.sparse_initializer)
    model = onnx.ModelProto()
    model.CopyFrom(plan.model)
    model.graph.CopyFrom(new_graph)
    del model.metadata_props[:]
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the generated {name} graph is invalid: {exc}") from exc
    return model


def build_training_graph(
    model_proto: onnx.ModelProto,
    trainable: Sequence[str] | None = None,
    loss: str = "softmax_cross_entropy",
    *,
    output: str | None = None,
    frozen: Sequence[str] | None = None,
    constants: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Differentiate an inference model into a training-step graph.

    Args:
        model_proto: the inference model (float32 or float64 weights).
        trainable: initializer names to train (None: every float initializer
            feeding a differentiable input; see :func:`plan_graph`).
        loss: ``"mse"``, ``"softmax_cross_entropy"`` or ``"binary_cross_entropy"``.
        output: model output the loss applies to (default: the first).
        frozen: weights to keep fixed (names or glob patterns).
        constants: initializers that are not parameters (names or globs).

    Returns:
        A model whose outputs are :data:`LOSS_OUTPUT` then
        ``grad_output_name(w)`` for each trainable weight, with the trainable
        weights as inputs (see the module docstring). It passes
        ``onnx.checker`` and runs on stock onnxruntime.

    Raises:
        UnsupportedOperatorError: a node on the gradient path uses an operator
            outside :data:`SUPPORTED_OPERATORS` (the message names the node).
        ModelError: the model cannot be trained (dtype, shapes, selection).
    """
    plan = plan_graph(
        model_proto, trainable, loss, output=output, frozen=frozen, constants=constants
    )
    return _training_graph_from_plan(plan)


def _training_graph_from_plan(plan: GraphPlan) -> onnx.ModelProto:
    diff = _Differentiator(plan)
    forward = _forward_nodes(plan, with_indices=True)
    for node in forward:
        for o in node.output:
            diff.b.taken.add(o)
    loss_name, dz = diff.loss_head()
    assert dz is not None
    loss_nodes = list(diff.b.nodes)
    diff.b.nodes.clear()
    grads = diff.backward(forward, plan.logits, dz)
    b = diff.b
    outputs = [helper.make_tensor_value_info(LOSS_OUTPUT, plan.elem_type, [])]
    tail: list[onnx.NodeProto] = [helper.make_node("Identity", [loss_name], [LOSS_OUTPUT])]
    for w in plan.trainable:
        shape = list(plan.shapes[w])
        g = grads.get(w)
        if g is None:  # the weight does not influence the loss
            g = b.op1(
                "ConstantOfShape",
                [b.i64(shape)],
                value=numpy_helper.from_array(np.zeros(1, dtype=b.np_dtype)),
            )
        tail.append(helper.make_node("Identity", [g], [grad_output_name(w)]))
        outputs.append(helper.make_tensor_value_info(grad_output_name(w), plan.elem_type, shape))
    init_by_name = {t.name: t for t in plan.model.graph.initializer}
    for name, value in plan.state_updates.items():
        t = init_by_name[name]
        tail.append(helper.make_node("Identity", [value], [state_output_name(name)]))
        outputs.append(
            helper.make_tensor_value_info(state_output_name(name), t.data_type, list(t.dims))
        )
    nodes = [*forward, *loss_nodes, *b.nodes, *tail]
    return _assemble(plan, nodes, b.inits, outputs, with_target=True, name="edgefl_training")


def build_eval_graph(plan: GraphPlan) -> onnx.ModelProto:
    """Return a graph computing the loss and the prediction (no gradients).

    Inputs are those of the training graph; outputs are :data:`LOSS_OUTPUT`
    and the model output ``plan.output``.
    """
    diff = _Differentiator(plan)
    forward = _forward_nodes(plan, with_indices=False)
    loss_name, _ = diff.loss_head(with_grad=False)
    b = diff.b
    nodes = [*forward, *b.nodes, helper.make_node("Identity", [loss_name], [LOSS_OUTPUT])]
    out_vi = next(o for o in plan.model.graph.output if o.name == plan.output)
    outputs = [helper.make_tensor_value_info(LOSS_OUTPUT, plan.elem_type, []), out_vi]
    return _assemble(plan, nodes, b.inits, outputs, with_target=True, name="edgefl_eval")


def weights_as_inputs(plan: GraphPlan) -> onnx.ModelProto:
    """Return the inference model with the trainable weights turned into inputs."""
    forward = _forward_nodes(plan, with_indices=False)
    out_vi = next(o for o in plan.model.graph.output if o.name == plan.output)
    return _assemble(plan, forward, [], [out_vi], with_target=False, name="edgefl_forward")
