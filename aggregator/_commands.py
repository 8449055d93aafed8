"""The server package's ``edgefl`` commands (see :mod:`edge_sdk._commands`)."""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "aggregator": ("aggregator.cli", "run the aggregator service"),
    "keyholder": ("aggregator.keyholder_cli", "run a key-holder committee member"),
    "status": ("aggregator.status_cli", "show round, contributors and rejections"),
}
# The key ceremony belongs to the committee side, under the device package's `keys` group.
EXTENSIONS: dict[str, str] = {"keys": "aggregator.keyholder_cli:register_ceremony"}
