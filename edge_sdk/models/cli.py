"""``edgefl model``: inspect ONNX models and export PyTorch modules for training.

``edgefl model export FACTORY --input-shape 2,12 --out model.onnx`` (needs
PyTorch) calls ``FACTORY`` (``MODULE:NAME`` or ``FILE.py:NAME``) and writes the
module with :func:`edge_sdk.models.export_torch`, then inspects the result.

``edgefl model inspect FILE.onnx [--json]`` prints the parameter counts
(trainable / frozen / constant), the operators, the inputs and outputs with
shapes and dtypes, whether the model will train (and if not, why) and the
dimension the aggregator must announce.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``model`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    inspect = sub.add_parser(
        "inspect",
        help="show parameters, operators, shapes and whether a model trains",
        description="Show what an ONNX model holds and whether edgefl can train it.",
    )
    inspect.add_argument("file", help="the .onnx file")
    inspect.add_argument(
        "--loss",
        default="softmax_cross_entropy",
        choices=("softmax_cross_entropy", "binary_cross_entropy", "mse"),
        help="the loss the devices will train with (default: softmax_cross_entropy)",
    )
    inspect.add_argument(
        "--trainable", action="append", metavar="NAME", help="train only these (globs ok)"
    )
    inspect.add_argument("--frozen", action="append", metavar="NAME", help="keep these fixed")
    inspect.add_argument(
        "--constant", action="append", metavar="NAME", help="these are not parameters"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_inspect)

    export = sub.add_parser(
        "export",
        help="export a PyTorch module for training (needs PyTorch)",
        description=(
            "Export a PyTorch module with edge_sdk.models.export_torch: training-mode "
            "export, constant folding off, weights inline, parameter list in the metadata."
        ),
    )
    export.add_argument(
        "factory",
        help="MODULE:NAME or FILE.py:NAME, a callable returning the torch.nn.Module",
    )
    export.add_argument(
        "--input-shape", required=True, help="example batch shape, e.g. 2,12 (first axis: batch)"
    )
    export.add_argument(
        "--input-dtype", default="float32", choices=("float32", "int64"), help="example dtype"
    )
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    export.add_argument(
        "--trainable", action="append", metavar="NAME", help="train only these (globs ok)"
    )
    export.add_argument("--json", action="store_true", help="print the inspection as JSON")
    export.set_defaults(func=_export)


def _shape(entry: dict[str, Any]) -> str:
    shape = entry["shape"]
    dims = "?" if shape is None else ", ".join("?" if d is None else str(d) for d in shape)
    return f"{entry['name']}: {entry['dtype']} ({dims})"


def _inspect(args: argparse.Namespace) -> int:
    from edge_sdk.cli import EXIT_FAILURE, EXIT_OK, emit
    from edge_sdk.models.inspection import inspect_model

    info = inspect_model(
        args.file,
        loss=args.loss,
        trainable=args.trainable,
        frozen=args.frozen,
        constants=args.constant,
    )
    lines = [f"{info['file']} (opset {info['opset']}, {info['producer'] or 'unknown producer'})"]
    lines += ["inputs:", *(f"  {_shape(e)}" for e in info["inputs"])]
    lines += ["outputs:", *(f"  {_shape(e)}" for e in info["outputs"])]
    ops = ", ".join(f"{op} x{count}" for op, count in info["operators"].items())
    lines.append(f"operators: {ops}")
    if info["unsupported_operators"]:
        lines.append(
            "not differentiable (fine off the gradient path): "
            + ", ".join(info["unsupported_operators"])
        )
    params = info["parameters"]
    if params is not None:
        lines.append("parameters:")
        for role in ("trainable", "frozen", "constant"):
            entry = params[role]
            lines.append(f"  {role:9} {entry['tensors']:4d} tensors {entry['values']:10d} values")
        if params.get("blocked"):
            lines.append(f"  blocked   {', '.join(params['blocked'])} (counted as frozen above)")
    lines += [f"warning: {w}" for w in info["warnings"]]
    if info["will_train"]:
        lines.append(f"will train: yes ({info['loss']})")
        lines.append(f"dimension: {info['dimension']} (announce this in the aggregator config)")
    else:
        lines.append(f"will train: NO ({info['loss']})")
        lines.append(f"why: {info['reason']}")
    emit(info, as_json=args.json, text="\n".join(lines))
    return EXIT_OK if info["will_train"] else EXIT_FAILURE


def _factory(spec: str) -> Any:
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    from edge_sdk.errors import ConfigError

    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"factory must be MODULE:NAME or FILE.py:NAME. Found {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"no such file: {path}")
        sys.path.insert(0, str(path.resolve().parent))
        module_spec = importlib.util.spec_from_file_location(f"edgefl_export_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise ConfigError(f"{target} has no attribute {name!r}")
    return getattr(module, name)


def _export(args: argparse.Namespace) -> int:
    from edge_sdk.cli import EXIT_FAILURE, EXIT_OK, emit
    from edge_sdk.errors import ConfigError
    from edge_sdk.models.inspection import inspect_model
    from edge_sdk.models.torch_export import export_torch

    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError as exc:
        raise ConfigError(f"--input-shape must be integers like 2,12: {exc}") from exc
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape must be positive integers. Found {args.input_shape!r}")
    import importlib

    try:
        torch: Any = importlib.import_module("torch")
    except ImportError as exc:
        raise ConfigError("edgefl model export needs PyTorch on this machine") from exc
    module = _factory(args.factory)()
    if args.input_dtype == "int64":
        example = torch.zeros(shape, dtype=torch.int64)
    else:
        example = torch.zeros(shape, dtype=torch.float32)
    export_torch(module, example, args.out, opset=args.opset, trainable=args.trainable)
    info = inspect_model(args.out)
    counts = info["parameters"] or {}
    text = (
        f"wrote {args.out}: "
        + ", ".join(f"{role} {counts[role]['values']}" for role in counts if role != "blocked")
        + (f"; dimension {info['dimension']}" if info["will_train"] else f"; {info['reason']}")
    )
    emit(info, as_json=args.json, text=text)
    return EXIT_OK if info["will_train"] else EXIT_FAILURE
