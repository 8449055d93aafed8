"""The one ``edgefl`` command line.

Each command group lives in its own module exposing ``register(parser)``;
this file only wires them together, so ``edgefl --help`` stays fast: command
modules import heavy libraries (onnx, phe, paho) inside their handlers.

Exit codes follow the usual conventions: 0 success, 1 a failure while doing
the work (the message says what and why), 2 a usage error (bad arguments,
missing or invalid configuration), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_sdk._version import __version__
from edge_sdk.errors import ConfigError, EdgeFLError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "Handler", "emit", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]

# command name -> (module with register(parser), one-line help). Modules that
# are not importable yet (a later issue adds them) are left out of the CLI.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("firmware_sim.demo_cli", "run the one-command demo (broker, key holder, fleet)"),
    "keys": ("edge_sdk.crypto.cli", "generate, show and precompute Paillier keys"),
    "privacy": ("edge_sdk.privacy.cli", "calibrate noise and report privacy spend"),
    "device": ("edge_sdk.device_cli", "enroll and run a device agent"),
    "aggregator": ("aggregator.cli", "run the aggregator service"),
    "keyholder": ("aggregator.keyholder_cli", "run the key holder service"),
    "status": ("aggregator.status_cli", "show round, contributors and rejections"),
    "sim": ("firmware_sim.cli", "simulate a fleet of devices"),
    "bench": ("edge_sdk.bench_cli", "run a benchmark and write its figures as JSON"),
    "broker": ("firmware_sim.broker_cli", "run an MQTT broker for development and tests"),
    "pki": ("firmware_sim.pki_cli", "create a CA, issue and revoke certificates, write the CRL"),
    "model": ("edge_sdk.models.cli", "inspect and export ONNX models"),
}


def _load(module_name: str) -> Any | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return None
        raise


def available_commands() -> dict[str, str]:
    """Return the command groups present in this installation with their help."""
    return {
        name: help_text
        for name, (module, help_text) in COMMANDS.items()
        if _load(module) is not None
    }


def build_parser(
    prog: str = "edgefl", only: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """Build the argument parser.

    Args:
        prog: program name shown in usage lines.
        only: offer just these command groups (for ``python -m aggregator``
            and friends); all groups when None.

    Returns:
        The configured parser; each leaf sets ``func`` to its handler.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="edgefl: private federated learning for fleets of small Linux devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgefl {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name not in only:
            continue
        module = _load(module_name)
        if module is None:
            continue
        child = sub.add_parser(name, help=help_text, description=help_text)
        child.set_defaults(help_parser=child)
        module.register(child)
    return parser


def emit(data: Any, *, as_json: bool, text: str | None = None) -> None:
    """Print a command's result: JSON to stdout with ``--json``, else ``text``.

    Args:
        data: JSON-serialisable result.
        as_json: print ``data`` as JSON.
        text: human-readable rendering; defaults to indented JSON.
    """
    if as_json or text is None:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` ("-" means stdout), atomically."""
    payload = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(payload)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(payload, encoding="utf-8")
    tmp.replace(target)


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "edgefl",
    only: Sequence[str] | None = None,
) -> int:
    """Run the CLI and return its exit code.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.
        prog: program name for usage lines.
        only: restrict to these command groups (see :func:`build_parser`).

    Returns:
        The process exit code.
    """
    parser = build_parser(prog, only)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EdgeFLError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
