"""``edgefl demo``: the one-command demo.

Until the full demo lands (issue: fleet simulator and demo) this command
checks the installation, says what is available and exits 0.
"""

from __future__ import annotations

import argparse

from edge_sdk.cli import EXIT_OK, available_commands, emit

__all__ = ["register"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from firmware_sim.broker import find_mosquitto

    commands = available_commands()
    mosquitto = find_mosquitto()
    data = {
        "status": "demo not built yet",
        "commands": commands,
        "mosquitto": str(mosquitto) if mosquitto else None,
    }
    lines = [
        "edgefl demo: the full demo (broker, key holder, aggregator, 20 devices) is not built yet.",
        f"Mosquitto: {mosquitto or 'not found (the embedded broker will be used)'}",
        "Commands available in this installation:",
        *(f"  edgefl {name:<11} {text}" for name, text in commands.items()),
    ]
    emit(data, as_json=args.json, text="\n".join(lines))
    return EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` arguments to ``parser``."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_cmd_demo)
