"""The one ``edgefl`` command line.

Each command group lives in its own module exposing ``register(parser)``.
Each package declares its groups in a small ``_commands`` table, found
through the ``edgefl.commands`` entry points (pyproject.toml), so the device
package never names a server or simulator module. Only the group being run
is imported: ``edgefl --help`` lists the groups from the tables alone.

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

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "Handler",
    "available_commands",
    "build_parser",
    "command_table",
    "emit",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]

COMMAND_GROUP = "edgefl.commands"


def _tables() -> list[Any]:
    """Every installed package's command table (``edgefl.commands`` entry points).

    A table module (e.g. ``aggregator._commands``) only holds strings, so
    discovering the commands imports nothing heavy. The device package's own
    table is always present, even when run from a source tree.
    """
    from importlib.metadata import entry_points

    from edge_sdk import _commands as own

    tables: list[Any] = [own]
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        if ep.value.split(":")[0] == own.__name__:
            continue
        try:
            tables.append(ep.load())
        except ImportError:  # a package named by stale metadata: skip it
            continue
    return tables


def command_table() -> dict[str, tuple[str, str]]:
    """Command name -> (module with ``register(parser)``, one-line help)."""
    table: dict[str, tuple[str, str]] = {}
    for t in _tables():
        table.update(getattr(t, "COMMANDS", {}))
    return dict(sorted(table.items()))


def _extensions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in _tables():
        for group, target in getattr(t, "EXTENSIONS", {}).items():
            out.setdefault(group, []).append(target)
    return out


def _load(module_name: str) -> Any | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return None
        raise


def available_commands() -> dict[str, str]:
    """Return the command groups present in this installation with their help."""
    return {name: help_text for name, (_, help_text) in command_table().items()}


def _subparsers_of(parser: argparse.ArgumentParser) -> Any | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def build_parser(
    prog: str = "edgefl",
    only: Sequence[str] | None = None,
    *,
    load: Sequence[str] | None = None,
) -> argparse.ArgumentParser:
    """Build the argument parser.

    Args:
        prog: program name shown in usage lines.
        only: offer just these command groups (for ``python -m aggregator``
            and friends); all groups when None.
        load: register the arguments of just these groups (the one being
            run); the others are listed with their help only, so ``edgefl
            --help`` imports no command module. All groups when None.

    Returns:
        The configured parser; each loaded leaf sets ``func`` to its handler.
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
    extensions = _extensions()
    for name, (module_name, help_text) in command_table().items():
        if only is not None and name not in only:
            continue
        if load is not None and name not in load:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = _load(module_name)
        if module is None:
            continue
        child = sub.add_parser(name, help=help_text, description=help_text)
        child.set_defaults(help_parser=child)
        module.register(child)
        for target in extensions.get(name, []):
            mod_name, _, func_name = target.partition(":")
            extension = _load(mod_name)
            inner = _subparsers_of(child)
            if extension is not None and inner is not None:
                getattr(extension, func_name)(inner)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token
    return None


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
    from edge_sdk._fs import atomic_write

    atomic_write(Path(path), payload.encode("utf-8"), mode=0o644)


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
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(args_list)
    table = command_table()
    parser = build_parser(prog, only, load=[command] if command in table else [])
    try:
        args = parser.parse_args(args_list)
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
