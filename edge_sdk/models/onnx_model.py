"""ONNX models trained on the stock onnxruntime package.

:class:`OnnxModel` loads an inference model (exported from PyTorch or built
with ``onnx.helper``), builds its training graph with
:func:`~edge_sdk.models.onnx_autodiff.build_training_graph`, and runs every
SGD step as one ``InferenceSession.run`` whose weight inputs are views into
the model's flat float32 weight buffer. The optimizer update happens in numpy
on that buffer, in place, so nothing is rebuilt between steps.

Trust: a model file is code-like input. Loading parses it with onnx, checks it
with ``onnx.checker`` and bounds its size, but a hostile model can still make
onnxruntime use a lot of memory or CPU; devices should accept models only from
the federation (the global model arrives signed), not from arbitrary peers.
External-data tensors are read by :meth:`OnnxModel.from_file` from files next
to the model (within :data:`MAX_MODEL_BYTES`); ``from_bytes`` needs them inline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import ArrayLike, NDArray
from onnx import TensorProto, numpy_helper

from edge_sdk.errors import DecodeError, ModelError
from edge_sdk.models.base import (
    FloatArray,
    SGDTrainable,
    TrainConfig,
    TrainReport,
    WeightLayout,
    check_labels,
)
from edge_sdk.models.onnx_autodiff import (
    LOSS_OUTPUT,
    TARGET_INPUT,
    GraphPlan,
    build_eval_graph,
    grad_output_name,
    plan_graph,
    state_output_name,
    weights_as_inputs,
)
from edge_sdk.models.onnx_autodiff import (
    _training_graph_from_plan as _training_graph,
)
from edge_sdk.models.onnx_decompose import batchnorm_to_inference
from edge_sdk.protocol.limits import MAX_ONNX_FILE_BYTES

__all__ = ["MAX_MODEL_BYTES", "OnnxModel"]

#: Largest serialized model accepted by :meth:`OnnxModel.from_bytes` / ``from_file``.
MAX_MODEL_BYTES = MAX_ONNX_FILE_BYTES  # edge_sdk/protocol/limits.py

#: Rows per onnxruntime call in :meth:`OnnxModel.evaluate` and ``predict``.
_EVAL_CHUNK = 1024


def _session(model: onnx.ModelProto, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime rejected the {model.graph.name} graph: {exc}") from exc


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def _inline_external_data(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Load external-data tensors (e.g. dynamo's ``model.onnx.data``) next to ``path``."""
    from onnx.external_data_helper import load_external_data_for_model

    base = path.resolve().parent
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or base not in target.parents or not target.is_file():
            raise DecodeError(
                f"{path}: initializer {tensor.name!r} stores its data in the external file "
                f"{location!r}, which is missing next to the model (expected {target}); "
                "copy it there or re-export with edge_sdk.models.export_torch, which keeps "
                "the weights inside the .onnx file"
            )
        total += int(info.get("length", target.stat().st_size))
    if total > MAX_MODEL_BYTES:
        raise DecodeError(f"{path}: external data is {total} bytes, more than {MAX_MODEL_BYTES}")
    try:
        load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise DecodeError(f"{path}: cannot read its external data: {exc}") from exc
    return model


class OnnxModel(SGDTrainable):
    """A trainable ONNX model (float32) running on stock onnxruntime.

    The flat weight layout is the trainable initializers in the order they
    appear in the model file. Metrics: ``loss`` plus ``accuracy`` for the
    cross-entropy losses or ``rmse`` for ``mse``.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        trainable: Sequence[str] | None = None,
        loss: str = "softmax_cross_entropy",
        output: str | None = None,
        threads: int = 1,
        frozen: Sequence[str] | None = None,
        constants: Sequence[str] | None = None,
    ) -> None:
        """Build the training graph and its onnxruntime session.

        Args:
            model: the inference model; it must have one data input and
                float32 weights.
            trainable: initializer names or glob patterns to train. None: the
                parameter list written by :func:`~edge_sdk.models.export_torch`
                when the file has one, else every float weight that can receive
                a gradient. Name a subset to fine-tune a head (the rest is frozen).
            loss: ``"softmax_cross_entropy"`` (integer labels),
                ``"binary_cross_entropy"`` (0/1 targets, output = logit or
                Sigmoid probability) or ``"mse"``.
            output: the model output to train (default: the first).
            threads: onnxruntime intra-op threads (1 is fastest for small models).
            frozen: names or glob patterns of weights to keep fixed.
            constants: names or glob patterns of initializers that are not
                parameters (e.g. a ``1/sqrt(d)`` scale stored by an exporter).

        Every initializer ends up trainable, frozen (the caller said so) or a
        constant (non-float, a structural input such as BatchNormalization
        running statistics, or marked); see :attr:`roles`.

        Raises:
            UntrainableWeightError: a weight that is neither frozen nor a
                constant cannot receive a gradient (it names the weight and
                the nodes in the way).
            UnsupportedOperatorError: an operator on the gradient path has no
                gradient rule (the message names the node).
            ModelError: the model is invalid or cannot be trained.
        """
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1. Found {threads!r}")
        if _uses_external_data(model):
            raise ModelError(
                "the model keeps its weights in an external-data file; load it with "
                "OnnxModel.from_file (which reads the file next to the model) or export "
                "it with edge_sdk.models.export_torch, which keeps the weights inline"
            )
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"invalid ONNX model: {exc}") from exc
        plan = plan_graph(model, trainable, loss, output=output, frozen=frozen, constants=constants)
        if plan.elem_type != TensorProto.FLOAT:
            raise ModelError("OnnxModel trains float32 models; convert the weights to float32")
        if len(plan.data_inputs) != 1:
            raise ModelError(
                f"OnnxModel needs exactly one data input; the model has {list(plan.data_inputs)}"
            )
        self._source = onnx.ModelProto()
        self._source.CopyFrom(model)
        self._infer_source: onnx.ModelProto
        self._infer_plan: GraphPlan
        self._plan = plan
        self._threads = threads
        self._input = plan.data_inputs[0]
        input_vi = next(vi for vi in plan.model.graph.input if vi.name == self._input)
        in_type = input_vi.type.tensor_type
        input_dtypes: dict[int, type[np.generic]] = {
            int(TensorProto.FLOAT): np.float32,
            int(TensorProto.INT64): np.int64,
            int(TensorProto.INT32): np.int32,
        }
        if in_type.elem_type not in input_dtypes:
            raise ModelError(
                f"input {self._input!r} must be float32, int64 or int32 (token ids); found "
                f"{TensorProto.DataType.Name(in_type.elem_type)}"
            )
        self._input_dtype = input_dtypes[in_type.elem_type]
        self._input_dims: tuple[int | None, ...] = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in in_type.shape.dim
        )
        inits = {t.name: t for t in plan.model.graph.initializer}
        layout = WeightLayout.from_shapes([(n, plan.shapes[n]) for n in plan.trainable])
        self._init_storage(layout, {n: numpy_helper.to_array(inits[n]) for n in plan.trainable})
        self._state = {
            n: np.array(numpy_helper.to_array(inits[n]), copy=True) for n in plan.state_inputs
        }
        if plan.state_updates:
            # Training uses batch statistics; evaluation, prediction and export use the
            # running statistics kept in self._state (PyTorch's train() / eval()).
            self._infer_source = batchnorm_to_inference(model)
            self._infer_plan = plan_graph(
                self._infer_source,
                list(plan.trainable),
                loss,
                output=output,
                constants=[n for n in plan.constants if n not in plan.state_updates] or None,
                state=list(plan.state_updates),
            )
        else:
            self._infer_source, self._infer_plan = self._source, plan
        self._train_session = _session(_training_graph(plan), threads)
        self._train_outputs = [
            LOSS_OUTPUT,
            *(grad_output_name(n) for n in plan.trainable),
            *(state_output_name(n) for n in plan.state_updates),
        ]
        self._grad_buf = np.empty(layout.size, dtype=np.float32)
        self._grad_views = layout.split(self._grad_buf)
        self._eval_session: Any = None
        self._forward_session: Any = None
        self._updating_state = False

    # -- construction helpers ------------------------------------------------
    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        trainable: Sequence[str] | None = None,
        loss: str = "softmax_cross_entropy",
        **kwargs: Any,
    ) -> OnnxModel:
        """Load a serialized model (see :meth:`__init__` for the arguments).

        Raises:
            DecodeError: the bytes are not an ONNX model or exceed
                :data:`MAX_MODEL_BYTES`.
        """
        if len(data) > MAX_MODEL_BYTES:
            raise DecodeError(f"model is {len(data)} bytes, more than {MAX_MODEL_BYTES}")
        try:
            model = onnx.load_from_string(bytes(data))
        except Exception as exc:  # protobuf raises DecodeError of its own
            raise DecodeError(f"not an ONNX model: {exc}") from exc
        return cls(model, trainable=trainable, loss=loss, **kwargs)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        trainable: Sequence[str] | None = None,
        loss: str = "softmax_cross_entropy",
        **kwargs: Any,
    ) -> OnnxModel:
        """Load a model file (see :meth:`__init__` for the arguments)."""
        p = Path(path)
        size = p.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise DecodeError(f"model file {p} is {size} bytes, more than {MAX_MODEL_BYTES}")
        data = p.read_bytes()
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:
            raise DecodeError(f"{p} is not an ONNX model: {exc}") from exc
        if _uses_external_data(model):
            model = _inline_external_data(model, p)
        return cls(model, trainable=trainable, loss=loss, **kwargs)

    # -- properties ------------------------------------------------------------
    @property
    def loss(self) -> str:
        """The training loss name."""
        return self._plan.loss

    @property
    def input_name(self) -> str:
        """Name of the model's data input."""
        return self._input

    @property
    def roles(self) -> dict[str, tuple[str, ...]]:
        """Initializer names by role: ``trainable``, ``frozen`` and ``constant``."""
        return {
            "trainable": self._plan.trainable,
            "frozen": self._plan.frozen,
            "constant": self._plan.constants,
        }

    def parameter_counts(self) -> dict[str, int]:
        """Number of values per role (``trainable``, ``frozen``, ``constant``)."""
        sizes = {t.name: math.prod(t.dims) for t in self._plan.model.graph.initializer}
        return {role: sum(sizes[n] for n in names) for role, names in self.roles.items()}

    def export_onnx(self) -> bytes:
        """Return the inference model with the current weights, serialized.

        The result keeps the original graph, opset and non-trainable
        initializers and passes ``onnx.checker``. Training-mode
        BatchNormalization nodes are switched to inference mode, with the
        running statistics updated by training.
        """
        model = onnx.ModelProto()
        model.CopyFrom(self._infer_source)
        for init in model.graph.initializer:
            if init.name in self._views:
                init.CopyFrom(numpy_helper.from_array(self._views[init.name], init.name))
            elif init.name in self._state:
                init.CopyFrom(numpy_helper.from_array(self._state[init.name], init.name))
        onnx.checker.check_model(model)
        return bytes(model.SerializeToString())

    # -- data ------------------------------------------------------------------
    def _inputs(self, x: ArrayLike) -> NDArray[Any]:
        arr = np.asarray(x)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"x must be numeric, got dtype {arr.dtype}")
        if arr.ndim < 1:
            raise ValueError("x must have a batch axis")
        if self._input_dtype is not np.float32:
            if np.issubdtype(arr.dtype, np.floating) and not (
                np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
            ):
                raise ValueError(f"input {self._input!r} holds integer ids; x has fractions")
            xs = np.ascontiguousarray(arr, dtype=self._input_dtype)
        else:
            xs = np.ascontiguousarray(arr, dtype=np.float32)
            if not np.all(np.isfinite(xs)):
                raise ValueError("x contains NaN or infinity")
        rest = self._input_dims[1:]
        if len(rest) != xs.ndim - 1 or any(
            d is not None and d != s for d, s in zip(rest, xs.shape[1:], strict=False)
        ):
            if all(d is not None for d in rest) and math.prod(xs.shape[1:]) == math.prod(
                d for d in rest if d is not None
            ):
                xs = xs.reshape((xs.shape[0], *(d for d in rest if d is not None)))
            else:
                raise ValueError(
                    f"x must have shape (n, {', '.join(str(d or '?') for d in rest)}) "
                    f"for input {self._input!r}, got {xs.shape}"
                )
        return xs

    def _targets(self, y: ArrayLike, n: int) -> NDArray[Any]:
        plan = self._plan
        if plan.loss == "softmax_cross_entropy":
            n_classes = self._n_classes()
            return check_labels(y, n, n_classes if n_classes is not None else 2**62)
        arr = np.asarray(y)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.floating)
            or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_
        ):
            raise ValueError(f"y must be numeric, got dtype {arr.dtype}")
        ys = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(ys)):
            raise ValueError("y contains NaN or infinity")
        rest = plan.target_dims[1:]
        if ys.ndim == 0 or ys.shape[0] != n:
            raise ValueError(f"y must have {n} rows, got shape {ys.shape}")
        if ys.shape[1:] != tuple(rest):
            if all(d is not None for d in rest) and math.prod(ys.shape[1:]) == math.prod(
                d for d in rest if d is not None
            ):
                ys = ys.reshape((n, *(d for d in rest if d is not None)))
            elif any(d is not None for d in rest) or len(rest) != ys.ndim - 1:
                raise ValueError(
                    f"y must have shape (n, {', '.join(str(d or '?') for d in rest)}), "
                    f"got {ys.shape}"
                )
        if plan.loss == "binary_cross_entropy" and (np.any(ys < 0) or np.any(ys > 1)):
            raise ValueError("binary_cross_entropy targets must lie in [0, 1]")
        return ys

    def _n_classes(self) -> int | None:
        graph = self._plan.model.graph
        for vi in [*graph.value_info, *graph.output]:
            if vi.name == self._plan.logits:
                dims = vi.type.tensor_type.shape.dim
                if len(dims) == 2 and dims[1].HasField("dim_value"):
                    return int(dims[1].dim_value)
        return None

    def _prepare(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[Any], NDArray[Any]]:
        xs = self._inputs(x)
        return xs, self._targets(y, xs.shape[0])

    # -- training --------------------------------------------------------------
    def _batch_loss_grad(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[float, FloatArray]:
        feeds: dict[str, Any] = {self._input: x, TARGET_INPUT: y}
        feeds.update(self._views)
        feeds.update(self._state)
        try:
            results = self._train_session.run(self._train_outputs, feeds)
        except Exception as exc:
            raise ModelError(f"onnxruntime failed during a training step: {exc}") from exc
        n_grads = len(self._plan.trainable)
        for name, grad in zip(self._plan.trainable, results[1 : 1 + n_grads], strict=True):
            self._grad_views[name][...] = grad
        if self._updating_state:
            for name, value in zip(self._plan.state_updates, results[1 + n_grads :], strict=True):
                np.copyto(self._state[name], value)
        return float(results[0]), self._grad_buf

    def fit(
        self,
        x: ArrayLike,
        y: ArrayLike,
        *,
        config: TrainConfig,
        seed: int,
        global_weights: ArrayLike | Mapping[str, ArrayLike] | None = None,
    ) -> TrainReport:
        """Train in place (see :meth:`SGDTrainable.fit`).

        Running statistics of training-mode BatchNormalization are updated at
        every step like PyTorch's and restored with the weights on failure.
        They are local state: not part of the flat vector.
        """
        saved = {k: v.copy() for k, v in self._state.items()}
        self._updating_state = True
        try:
            return super().fit(x, y, config=config, seed=seed, global_weights=global_weights)
        except BaseException:
            for name, value in saved.items():
                np.copyto(self._state[name], value)
            raise
        finally:
            self._updating_state = False

    @property
    def state(self) -> dict[str, FloatArray]:
        """Copies of the non-trained state (BatchNormalization running statistics)."""
        return {k: v.copy() for k, v in self._state.items()}

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, x: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Return ``loss`` plus ``accuracy`` (cross-entropy losses) or ``rmse`` (mse)."""
        xs, ys = self._prepare(x, y)
        n = xs.shape[0]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        if self._eval_session is None:
            self._eval_session = _session(build_eval_graph(self._infer_plan), self._threads)
        total = 0.0
        correct = 0.0
        for start in range(0, n, _EVAL_CHUNK):
            xb, yb = xs[start : start + _EVAL_CHUNK], ys[start : start + _EVAL_CHUNK]
            feeds: dict[str, Any] = {self._input: xb, TARGET_INPUT: yb}
            feeds.update(self._views)
            feeds.update(self._state)
            loss, out = self._eval_session.run([LOSS_OUTPUT, self._plan.output], feeds)
            total += float(loss) * xb.shape[0]
            if self._plan.loss == "softmax_cross_entropy":
                correct += float(np.sum(np.argmax(out, axis=1) == yb))
            elif self._plan.loss == "binary_cross_entropy":
                threshold = 0.5 if self._plan.output_is_probability else 0.0
                correct += float(np.sum((out.reshape(yb.shape) > threshold) == (yb > 0.5)))
        loss_mean = total / n
        if self._plan.loss == "mse":
            return {"loss": loss_mean, "rmse": math.sqrt(loss_mean)}
        per_example = 1 if self._plan.loss == "softmax_cross_entropy" else ys[0].size
        return {"loss": loss_mean, "accuracy": correct / (n * per_example)}

    def predict(self, x: ArrayLike) -> NDArray[np.float32]:
        """Return the model output for each row of ``x`` (logits or probabilities)."""
        xs = self._inputs(x)
        if self._forward_session is None:
            self._forward_session = _session(weights_as_inputs(self._infer_plan), self._threads)
        parts = []
        for start in range(0, xs.shape[0], _EVAL_CHUNK):
            feeds: dict[str, Any] = {self._input: xs[start : start + _EVAL_CHUNK]}
            feeds.update(self._views)
            feeds.update(self._state)
            parts.append(self._forward_session.run([self._plan.output], feeds)[0])
        if not parts:
            return np.zeros((0,), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        counts = self.parameter_counts()
        roles = self.roles
        return (
            f"OnnxModel(loss={self._plan.loss!r}, parameters={self._layout.size}, "
            f"trainable={len(roles['trainable'])} tensors/{counts['trainable']} values, "
            f"frozen={len(roles['frozen'])} tensors/{counts['frozen']} values, "
            f"constant={len(roles['constant'])} tensors/{counts['constant']} values)"
        )
