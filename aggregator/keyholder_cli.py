"""``edgefl keyholder serve``: the key holder as its own MQTT service."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

__all__ = ["register"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``serve`` and ``show-identity``."""
    sub = parser.add_subparsers(dest="keyholder_command", metavar="ACTION")
    serve = sub.add_parser("serve", help="answer decryption requests until stopped")
    serve.add_argument("--config", required=True, help="aggregator.toml ([keyholder] table)")
    serve.set_defaults(func=_serve)
    show = sub.add_parser(
        "show-identity", help="print the key holder's Ed25519 public key (hex) for the aggregator"
    )
    show.add_argument("--config", required=True)
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from aggregator.config import _identity, load_config

    print(_identity(load_config(args.config)).public_key_bytes.hex())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from aggregator.config import build_keyholder, load_config, make_transport
    from aggregator.keyholder_service import KeyholderService

    cfg = load_config(args.config)
    keyholder = build_keyholder(cfg)
    settings = dict(cfg.transport)
    settings["client_id"] = str(cfg.keyholder.get("client_id", "edgefl-keyholder"))
    transport = make_transport(settings, default_client_id="edgefl-keyholder")
    state = cfg.path(str(cfg.keyholder.get("state", "keyholder-state.json")))
    service = KeyholderService(keyholder, transport, state_path=state)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    print(f"key holder serving federation {keyholder.federation}", flush=True)
    try:
        stop.wait()
    finally:
        service.close()
    return 0
