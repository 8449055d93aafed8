"""What an ONNX model file holds and whether edgefl can train it.

:func:`inspect_model` backs ``edgefl model inspect``. It never raises for a
model that cannot be trained: the answer says why instead.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from edge_sdk.errors import DecodeError, ModelError
from edge_sdk.models.onnx_autodiff import (
    FROZEN_METADATA_KEY,
    SUPPORTED_OPERATORS,
    TRAINABLE_METADATA_KEY,
    UntrainableWeightError,
)
from edge_sdk.models.onnx_model import MAX_MODEL_BYTES, OnnxModel

__all__ = ["inspect_model"]


def _value_info(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    tt = vi.type.tensor_type
    shape: list[int | str | None] | None = None
    if tt.HasField("shape"):
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        ]
    dtype = TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def inspect_model(
    source: str | os.PathLike[str] | onnx.ModelProto,
    *,
    loss: str = "softmax_cross_entropy",
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] | None = None,
    constants: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Describe a model: parameters by role, operators, inputs, outputs, trainability.

    Args:
        source: a model file or a loaded model.
        loss: the loss the device will train with.
        trainable: as for :class:`~edge_sdk.models.OnnxModel`.
        frozen: as for :class:`~edge_sdk.models.OnnxModel`.
        constants: as for :class:`~edge_sdk.models.OnnxModel`.

    Returns:
        A JSON-serialisable dict with ``inputs``, ``outputs`` (name, dtype,
        shape), ``operators`` (op -> count), ``unsupported_operators`` (ops
        outside the differentiable set; harmless off the gradient path),
        ``parameters`` (tensors and values per role, names per role),
        ``will_train``, ``reason`` (None when it trains), ``blocked`` (weight
        -> nodes in the way) and ``dimension`` (the flat vector length the
        aggregator must announce, None when it does not train).

    Raises:
        DecodeError: the file is not an ONNX model or is too large.
    """
    kwargs: dict[str, Any] = {
        "loss": loss,
        "trainable": trainable,
        "frozen": frozen,
        "constants": constants,
    }
    path: Path | None = None
    if isinstance(source, onnx.ModelProto):
        proto = source
        label = "<model>"
    else:
        path = Path(source)
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise DecodeError(f"model file {path} is larger than {MAX_MODEL_BYTES} bytes")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise DecodeError(f"{path} is not an ONNX model: {exc}") from exc
        label = str(path)

    def load(**kw: Any) -> OnnxModel:
        return OnnxModel(proto, **kw) if path is None else OnnxModel.from_file(path, **kw)

    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph.node
    )
    opset = next((int(i.version) for i in proto.opset_import if i.domain in ("", "ai.onnx")), None)
    info: dict[str, Any] = {
        "file": label,
        "opset": opset,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "metadata": {p.key: p.value for p in proto.metadata_props},
        "exported_with_roles": any(
            p.key in (TRAINABLE_METADATA_KEY, FROZEN_METADATA_KEY) for p in proto.metadata_props
        ),
        "inputs": [_value_info(vi) for vi in graph.input if vi.name not in inits],
        "outputs": [_value_info(vi) for vi in graph.output],
        "operators": dict(sorted(ops.items())),
        "unsupported_operators": sorted(op for op in ops if op not in SUPPORTED_OPERATORS),
        "loss": loss,
        "will_train": False,
        "reason": None,
        "blocked": {},
        "dimension": None,
        "parameters": None,
    }
    model: OnnxModel | None = None
    try:
        model = load(**kwargs)
    except UntrainableWeightError as exc:
        info["reason"] = str(exc)
        info["blocked"] = exc.blocked
        try:  # the counts as they would be with the blocked weights frozen
            more = [*(frozen or []), *exc.blocked]
            info["parameters"] = _roles(load(**{**kwargs, "frozen": more}))
            info["parameters"]["blocked"] = sorted(exc.blocked)
        except (ModelError, ValueError):
            pass
    except (ModelError, ValueError) as exc:
        info["reason"] = str(exc)
    info["warnings"] = []
    if proto.producer_name == "pytorch" and not info["exported_with_roles"]:
        info["warnings"].append(
            "exported from PyTorch without edge_sdk.models.export_torch: an eval-mode export "
            "folds BatchNorm into the Conv and may merge equal-valued initializers, so the "
            "trained model can differ from the PyTorch one"
        )
    if model is not None:
        scalars = [
            t.name
            for t in graph.initializer
            if t.name in model.roles["trainable"] and math.prod(t.dims) == 1
        ]
        if scalars and not info["exported_with_roles"]:
            info["warnings"].append(
                f"{len(scalars)} single-value initializers will be trained as parameters "
                f"({', '.join(scalars[:5])}{', ...' if len(scalars) > 5 else ''}); exporters "
                "store constants such as 1/sqrt(d) this way: mark them with constants= or "
                "export with edge_sdk.models.export_torch"
            )
        info["will_train"] = True
        info["dimension"] = model.layout.size
        info["parameters"] = _roles(model)
    return info


def _roles(model: OnnxModel) -> dict[str, Any]:
    counts = model.parameter_counts()
    return {
        role: {"tensors": len(names), "values": counts[role], "names": list(names)}
        for role, names in model.roles.items()
    }
