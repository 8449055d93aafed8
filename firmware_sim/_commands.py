"""The simulator package's ``edgefl`` commands (see :mod:`edge_sdk._commands`)."""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("firmware_sim.demo_cli", "run the one-command demo (broker, committee, fleet)"),
    "sim": ("firmware_sim.cli", "simulate a fleet of devices"),
    "broker": ("firmware_sim.broker_cli", "run an MQTT broker for development and tests"),
    "pki": ("firmware_sim.pki_cli", "create a CA, issue and revoke certificates, write the CRL"),
}
EXTENSIONS: dict[str, str] = {}
