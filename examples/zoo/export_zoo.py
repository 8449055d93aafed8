"""Export every model family of ``families.py`` for training with edgefl.

Run on a workstation with PyTorch installed::

    python examples/zoo/export_zoo.py --out zoo/ [--opset 17]

Each family is written to ``OUT/NAME.onnx`` with
:func:`edge_sdk.models.export_torch` (training-mode export, constant folding
off, weights inline, parameter list in the metadata). Check a file with
``edgefl model inspect OUT/NAME.onnx``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from families import FAMILIES, build

from edge_sdk.models import export_torch


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Export the families; return the written paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="zoo", help="output folder (default: zoo)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("families", nargs="*", help="families to export (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in args.families or list(FAMILIES):
        net, x, _ = build(name)
        path = out / f"{name}.onnx"
        export_torch(net, torch.from_numpy(x[:2]), path, opset=args.opset)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
