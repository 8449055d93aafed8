"""Export a PyTorch module to an ONNX file that edgefl trains correctly.

:func:`export_torch` runs on the workstation (PyTorch is never imported by
edgefl at module import time; only this function imports it). It exports in
the way the training-graph builder needs:

* **training mode, constant folding off** (``training=TrainingMode.TRAINING``,
  ``do_constant_folding=False``): BatchNormalization stays a separate node
  with ``training_mode=1`` (batch statistics, like ``module.train()``) instead
  of being folded into the preceding Conv, and the exporter does not
  deduplicate initializers by value (it does so in eval mode, which merged two
  freshly initialised BatchNorms into one shared tensor). Constants such as
  ``1/sqrt(d)`` stay ``Constant`` nodes instead of becoming initializers.
* **Dropout as identity**: the exported ``training_mode`` input of every
  Dropout is removed, so Dropout never drops on the device (edgefl cannot
  reproduce PyTorch's random masks; train the PyTorch reference with the
  Dropout modules in ``eval()`` for parity).
* **weights inline** (no external-data file), the **opset pinned**, the
  TorchScript exporter (``dynamo=False``; dynamo needs onnxscript).
* **metadata**: ``edgefl.trainable`` lists exactly the
  ``module.named_parameters()`` names to train (JSON), ``edgefl.frozen`` the
  other parameters. :class:`~edge_sdk.models.OnnxModel` reads them: every
  other initializer is a constant, never trained.
"""

from __future__ import annotations

import fnmatch
import importlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from edge_sdk.errors import ModelError
from edge_sdk.models.onnx_autodiff import FROZEN_METADATA_KEY, TRAINABLE_METADATA_KEY

__all__ = ["DEFAULT_EXPORT_OPSET", "export_torch"]

#: Opset written by :func:`export_torch` unless told otherwise.
DEFAULT_EXPORT_OPSET = 17


def _select(names: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        raise TypeError("trainable must be a sequence of names, not a string")
    chosen: set[str] = set()
    for pattern in patterns:
        hit = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ModelError(f"trainable entry {pattern!r} matches no parameter of the module")
        chosen.update(hit)
    return [n for n in names if n in chosen]


def _dropout_as_identity(model: onnx.ModelProto) -> None:
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2:
            dropped.update(node.input[2:])
            del node.input[2:]
    used = {i for node in model.graph.node for i in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [
        node
        for node in model.graph.node
        if not (node.op_type == "Constant" and node.output[0] in dropped - used)
    ]
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def export_torch(
    module: Any,
    example_input: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    opset: int = DEFAULT_EXPORT_OPSET,
    trainable: Sequence[str] | None = None,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Export ``module`` for training with edgefl (see the module docstring).

    Args:
        module: a ``torch.nn.Module``; its train/eval flags are restored after.
        example_input: one example batch (a tensor, or a tuple of tensors).
        path: where to write the ``.onnx`` file (None: only return the model).
        opset: the ONNX opset to pin (17 or newer).
        trainable: parameter names or glob patterns to train (None: every
            parameter with ``requires_grad``); the other parameters are
            recorded as frozen.
        input_names: graph input names.
        output_names: graph output names.
        dynamic_batch: make the first axis of inputs and outputs symbolic (``N``).

    Returns:
        The exported model (also written to ``path`` when given).

    Raises:
        ModelError: a parameter did not survive export as an initializer, or
            the selection matches nothing.
        ImportError: PyTorch is not installed.
    """
    # Imported here, never at module import: devices do not have PyTorch.
    torch: Any = importlib.import_module("torch")

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise ValueError(f"opset must be an integer >= 17. Found {opset!r}")
    params = [n for n, _ in module.named_parameters()]
    wanted = {n for n, p in module.named_parameters() if p.requires_grad}
    chosen = [n for n in _select(params, trainable) if n in wanted or trainable is not None]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    dynamic = {name: {0: "N"} for name in [*input_names, *output_names]} if dynamic_batch else None
    modes = {name: sub.training for name, sub in module.named_modules()}
    buffer = io.BytesIO()
    try:
        module.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buffer,
                dynamo=False,
                export_params=True,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                keep_initializers_as_inputs=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic,
            )
    finally:
        for name, sub in module.named_modules():
            sub.train(modes[name])
    model = onnx.load_from_string(buffer.getvalue())
    _dropout_as_identity(model)
    inits = {t.name for t in model.graph.initializer}
    missing = [n for n in params if n not in inits]
    if missing:
        raise ModelError(
            f"parameters {missing} are not initializers of the exported graph (the exporter "
            "renamed or folded them); edgefl cannot map them to the module's parameters"
        )
    del model.metadata_props[:]
    for key, value in (
        (TRAINABLE_METADATA_KEY, json.dumps(chosen)),
        (FROZEN_METADATA_KEY, json.dumps([n for n in params if n not in set(chosen)])),
        ("edgefl.exporter", f"torch {torch.__version__}, TorchScript exporter, opset {opset}"),
    ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    if path is not None:
        Path(path).write_bytes(model.SerializeToString())
    return model
