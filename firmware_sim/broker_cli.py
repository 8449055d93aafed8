"""``edgefl broker``: run a harness MQTT broker in the foreground."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from types import FrameType

from edge_sdk.cli import EXIT_OK

__all__ = ["register"]


def _cmd_run(args: argparse.Namespace) -> int:
    from firmware_sim.broker import MosquittoOptions, start_broker

    options = None
    if args.kind != "embedded":
        options = MosquittoOptions(
            persistence=not args.no_persistence,
            autosave_interval=args.autosave_interval,
            max_packet_size=args.max_packet_size,
            max_queued_messages=args.max_queued_messages,
            password_file=args.password_file,
            acl_file=args.acl_file,
        )
        if args.kind == "auto":
            from firmware_sim.broker import find_mosquitto

            if find_mosquitto() is None:
                options = None
    broker = start_broker(args.kind, port=args.port, workdir=args.workdir, options=options)
    info = {"kind": broker.kind, "url": broker.url, "mqtt5": broker.supports_mqtt5}
    if hasattr(broker, "log_path") and broker.log_path is not None:
        info["log"] = str(broker.log_path)
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(f"{broker.kind} broker listening on {broker.url} (Ctrl-C to stop)", flush=True)
        if "log" in info:
            print(f"log: {info['log']}", flush=True)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not done.wait(0.5):
            if not broker.running:
                print("broker exited unexpectedly", flush=True)
                return 1
    finally:
        broker.stop()
    return EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``broker`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="broker_command", metavar="SUBCOMMAND")
    run = sub.add_parser(
        "run",
        help="start a broker in the foreground",
        description="Start Mosquitto (or the embedded amqtt broker) on 127.0.0.1 and wait "
        "for Ctrl-C. The embedded broker speaks MQTT 3.1.1 only and keeps nothing on disk.",
    )
    run.add_argument(
        "--kind",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="broker implementation (default: Mosquitto when installed, else embedded)",
    )
    run.add_argument("--port", type=int, default=0, help="listener port (default: a free one)")
    run.add_argument("--workdir", type=Path, help="Mosquitto config/log/persistence folder")
    run.add_argument("--no-persistence", action="store_true", help="Mosquitto: keep nothing")
    run.add_argument("--autosave-interval", type=int, help="Mosquitto: seconds between saves")
    run.add_argument("--max-packet-size", type=int, help="Mosquitto: largest packet, bytes")
    run.add_argument("--max-queued-messages", type=int, help="Mosquitto: per-client queue")
    run.add_argument("--password-file", type=Path, help="Mosquitto password file")
    run.add_argument("--acl-file", type=Path, help="Mosquitto ACL file")
    run.add_argument("--json", action="store_true", help="print the broker's address as JSON")
    run.set_defaults(func=_cmd_run)
