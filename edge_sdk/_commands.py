"""The device package's ``edgefl`` commands (module, one-line help); imports nothing heavy.

Each package owns a table like this one and declares it as an
``edgefl.commands`` entry point in pyproject.toml; :mod:`edge_sdk.cli`
discovers them there, so the device package never names server or
simulator modules. ``EXTENSIONS`` adds subcommands to another package's
group: group name -> ``module:function`` called with that group's
subparsers action.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "keys": ("edge_sdk.crypto.cli", "the key ceremony; show and precompute Paillier keys"),
    "privacy": ("edge_sdk.privacy.cli", "calibrate noise and report privacy spend"),
    "device": ("edge_sdk.device_cli", "enroll and run a device agent"),
    "model": ("edge_sdk.models.cli", "inspect and export ONNX models"),
    "bench": ("edge_sdk.bench_cli", "run a benchmark and write its figures as JSON"),
}
EXTENSIONS: dict[str, str] = {}
