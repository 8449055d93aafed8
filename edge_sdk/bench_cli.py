"""``edgefl bench NAME --json FILE``: run a benchmark from ``benchmarks/``.

A benchmark is a module ``benchmarks/NAME.py`` defining
``run(quick: bool) -> dict[str, Any]``. The returned figures are written at
the top level of the JSON file, next to a ``meta`` block (machine, versions,
time). Speed targets are ratios against a baseline measured in the same run,
because absolute times drift on shared machines; a benchmark reports its
ratios and, under ``targets``, whether each target was met.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_sdk._version import __version__
from edge_sdk.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, write_json

__all__ = ["benchmarks_dir", "list_benchmarks", "load_benchmark", "register", "run_benchmark"]


def benchmarks_dir() -> Path:
    """Return the benchmarks folder (``$EDGEFL_BENCHMARKS`` or the source tree's)."""
    override = os.environ.get("EDGEFL_BENCHMARKS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "benchmarks"


def list_benchmarks() -> list[str]:
    """Return the names of the available benchmarks, sorted."""
    folder = benchmarks_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/NAME.py`` by path.

    Raises:
        ValueError: no such benchmark (the message lists the available ones).
    """
    path = benchmarks_dir() / f"{name}.py"
    if not name.isidentifier() or not path.is_file():
        raise ValueError(
            f"unknown benchmark {name!r}; available: {', '.join(list_benchmarks()) or 'none'}"
        )
    # Benchmarks share helpers as ``benchmarks._name`` modules: make their
    # folder's parent importable.
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"edgefl_benchmarks.{name}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load benchmark {name!r} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, *, quick: bool = False) -> dict[str, Any]:
    """Run one benchmark and return its figures plus a ``meta`` block."""
    module = load_benchmark(name)
    started = time.time()
    figures: dict[str, Any] = dict(module.run(quick=quick))
    figures["meta"] = {
        "benchmark": name,
        "edgefl": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "started_unix": round(started, 3),
        "wall_s": round(time.time() - started, 3),
    }
    return figures


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        names = list_benchmarks()
        print("\n".join(names) if names else "no benchmarks found")
        return EXIT_OK if args.list or names else EXIT_USAGE
    try:
        figures = run_benchmark(args.name, quick=args.quick)
    except ValueError as exc:
        print(f"edgefl bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        write_json(args.json, figures)
    if args.json != "-":
        for key, value in figures.items():
            if key not in ("meta", "targets"):
                print(f"{key:>36}: {value}")
        for key, target in figures.get("targets", {}).items():
            print(f"{'target ' + key:>36}: {target}")
    missed = [k for k, t in figures.get("targets", {}).items() if not t.get("met", True)]
    if missed and args.strict:
        print(f"edgefl bench: targets missed: {', '.join(missed)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` arguments to ``parser``."""
    parser.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON ('-' = stdout)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for smoke tests")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target in the results is missed"
    )
    parser.set_defaults(func=_cmd_bench)
