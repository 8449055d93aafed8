"""``edgefl bench NAME --json FILE``: run one of edgefl's benchmarks.

A benchmark is a module ``edgefl_benchmarks.NAME`` (the repository's
``benchmarks/`` folder, installed with the package, so a device installed
from the wheel runs them too) defining ``run(quick: bool) -> dict[str, Any]``.
The returned figures are written at the top level of the JSON file, next to a
``meta`` block (machine, versions, time). Speed targets are ratios against a
baseline measured in the same run, because absolute times drift on shared
machines; a benchmark reports its ratios and, under ``targets``, whether each
target was met.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import sys
import time
from types import ModuleType
from typing import Any

from edge_sdk._version import __version__
from edge_sdk.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, write_json

__all__ = ["PACKAGE", "list_benchmarks", "load_benchmark", "register", "run_benchmark"]

#: The installed package holding the benchmarks (source: ``benchmarks/``).
PACKAGE = "edgefl_benchmarks"


def list_benchmarks() -> list[str]:
    """Return the names of the available benchmarks, sorted."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        return []
    return sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_") and not info.ispkg
    )


def load_benchmark(name: str) -> ModuleType:
    """Import the benchmark module ``name``.

    Raises:
        ValueError: no such benchmark (the message lists the available ones).
    """
    available = list_benchmarks()
    if name not in available:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(available) or 'none'}")
    return importlib.import_module(f"{PACKAGE}.{name}")


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
