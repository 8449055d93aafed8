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


def _cmd_acl(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit
    from edge_sdk.errors import ConfigError
    from firmware_sim.acl import generate_broker_auth, load_credentials, read_device_ids

    if args.devices is not None and args.devices_file is not None:
        raise ConfigError("give --devices or --devices-file, not both")
    if args.devices is not None:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    elif args.devices_file is not None:
        devices = read_device_ids(args.devices_file)
    else:
        raise ConfigError("give the devices: --devices d1,d2 or --devices-file FILE")
    if not devices:
        raise ConfigError("the device list is empty")
    keep = None
    if args.reuse is not None:
        keep = load_credentials(args.reuse, federation=args.federation)
    auth = generate_broker_auth(
        args.federation,
        devices,
        aggregator_user=args.aggregator_user,
        keyholder_user=args.keyholder_user,
        keyholders=[h.strip() for h in args.keyholders.split(",") if h.strip()]
        if args.keyholders
        else None,
        aggregator_workers=args.workers,
        passwords=keep,
    )
    files = auth.write(args.out)
    kept = sorted(set(keep or {}) & set(auth.roles))
    result = {
        "federation": args.federation,
        "devices": len(devices),
        "users": sorted(auth.roles),
        "passwords_kept": kept,
        "password_file": str(files.password_file),
        "acl_file": str(files.acl_file),
        "credentials_file": str(files.credentials_file),
    }
    text = (
        f"federation {args.federation}: {len(devices)} devices + aggregator + "
        f"{len(auth.roles) - len(devices) - 1} key holder(s)\n"
        f"password file:    {files.password_file} (0600)\n"
        f"ACL file:         {files.acl_file}\n"
        f"credentials:      {files.credentials_file} (0600; plaintext passwords for "
        "provisioning, keep it secret)\n"
        "apply: mosquitto's password_file/acl_file, then SIGHUP (or edgefl broker run "
        "--password-file ... --acl-file ...)"
    )
    emit(result, as_json=args.json, text=text)
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

    acl = sub.add_parser(
        "acl",
        help="generate Mosquitto password and ACL files for a federation",
        description="Write passwd (Mosquitto $7$ hashes, 0600), acl and credentials.json "
        "(plaintext passwords for provisioning, 0600) into --out. Each device may write "
        "only its own updates/ and status/ topics and read the model, the round and its "
        "own ack/ topic. Re-run with --reuse to keep existing passwords when devices "
        "are added or removed, then reload Mosquitto (SIGHUP).",
    )
    acl.add_argument("--federation", required=True, help="federation name ([A-Za-z0-9_-])")
    acl.add_argument("--devices", help="comma-separated device ids")
    acl.add_argument("--devices-file", type=Path, help="file with one device id per line")
    acl.add_argument("--out", type=Path, required=True, help="output folder")
    acl.add_argument("--aggregator-user", default="aggregator", help="aggregator broker user")
    acl.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="also users {aggregator-user}-worker-0..N-1 with the aggregator's grants, for a "
        "sharded aggregator ([aggregator] workers = N; give each its [worker_broker.K])",
    )
    acl.add_argument(
        "--keyholders",
        default="keyholder-1,keyholder-2,keyholder-3",
        help="the committee members' ids, each its own broker user reading updates/+ and "
        "keyholder/request and writing only keyholder/result/{id} (default "
        "keyholder-1,keyholder-2,keyholder-3; empty for one legacy --keyholder-user)",
    )
    acl.add_argument(
        "--keyholder-user", default="keyholder", help="legacy single key holder broker user"
    )
    acl.add_argument(
        "--reuse",
        type=Path,
        help="an earlier credentials.json: keep the passwords of users still listed",
    )
    acl.add_argument("--json", action="store_true", help="print the result as JSON")
    acl.set_defaults(func=_cmd_acl)
