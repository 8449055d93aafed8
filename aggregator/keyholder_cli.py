"""``edgefl keyholder serve``: one committee member as its own MQTT service."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

__all__ = ["register"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``serve`` and ``show-identity``."""
    sub = parser.add_subparsers(dest="keyholder_command", metavar="ACTION")
    serve = sub.add_parser(
        "serve",
        help="verify updates and answer decryption requests with this member's share",
        description=(
            "Run one key-holder committee member: it watches the devices' updates "
            "read-only, checks every decryption request on its own and answers with its "
            "decryption share and a proof. Config: the keyholder.toml that "
            "`edgefl keys ceremony` wrote into this member's folder."
        ),
    )
    serve.add_argument("--config", required=True, help="keyholder.toml of this member")
    serve.set_defaults(func=_serve)
    approve = sub.add_parser(
        "approve",
        help="sign devices' enrollment in a registry (a device counts with T approvals)",
        description=(
            "Add this member's approval (an Ed25519 signature over federation, device id "
            "and the device's public key) to registry entries. Check each device's key "
            "out of band first: approving is what stops the aggregator's operator from "
            "creating contributors alone."
        ),
    )
    approve.add_argument("--config", required=True, help="keyholder.toml of this member")
    approve.add_argument(
        "--registry", help="registry file to sign in (default: the member's own registry)"
    )
    which = approve.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", action="append", help="device id (repeatable)")
    which.add_argument("--all", action="store_true", help="every active device")
    approve.add_argument("--json", action="store_true", help="print the result as JSON")
    approve.set_defaults(func=_approve)
    show = sub.add_parser(
        "show-identity", help="print this member's id, index and Ed25519 public key"
    )
    show.add_argument("--config", required=True, help="keyholder.toml of this member")
    show.add_argument("--json", action="store_true", help="print the result as JSON")
    show.set_defaults(func=_show)


def _approve(args: argparse.Namespace) -> int:
    from aggregator.keyholder_config import load_keyholder_config
    from edge_sdk.cli import emit
    from edge_sdk.errors import ConfigError
    from edge_sdk.identity import DeviceIdentity, DeviceRegistry

    cfg = load_keyholder_config(args.config)
    identity = DeviceIdentity.load(cfg.path(str(cfg.keyholder.get("identity", "identity.key"))))
    if identity.device_id != cfg.holder_id:
        raise ConfigError(f"identity key belongs to {identity.device_id}, not {cfg.holder_id}")
    path = args.registry or cfg.path(str(cfg.keyholder.get("registry", "registry.json")))
    registry = DeviceRegistry.load(path)
    ids = registry.active_ids() if args.all else list(args.device)
    for device_id in ids:
        if registry.get(device_id) is None:
            raise ConfigError(f"device {device_id!r} is not in {path}")
        registry.approve(device_id, identity)
    registry.save()
    emit(
        {"holder": cfg.holder_id, "registry": str(path), "approved": ids},
        as_json=args.json,
        text=f"{cfg.holder_id} approved {len(ids)} device(s) in {path}",
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from aggregator.committee import CommitteeManifest
    from aggregator.keyholder_config import load_keyholder_config
    from edge_sdk.cli import emit
    from edge_sdk.errors import ConfigError

    cfg = load_keyholder_config(args.config)
    manifest = CommitteeManifest.load(cfg.path(str(cfg.keyholder.get("manifest"))))
    info = manifest.holder(cfg.holder_id)
    if info is None:
        raise ConfigError(f"{cfg.holder_id} is not in the committee manifest")
    data = {
        "id": info.holder_id,
        "index": info.index,
        "public_key": info.public_key.hex(),
        "committee_fingerprint": manifest.fingerprint,
        "threshold": manifest.threshold,
        "holders": manifest.size,
    }
    text = (
        f"{info.holder_id}: member {info.index} of {manifest.size} (threshold "
        f"{manifest.threshold})\n  public key: {info.public_key.hex()}"
    )
    emit(data, as_json=args.json, text=text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from aggregator.config import make_transport
    from aggregator.keyholder_config import build_member, load_keyholder_config
    from aggregator.keyholder_service import KeyholderService

    cfg = load_keyholder_config(args.config)
    member = build_member(cfg)
    settings = dict(cfg.transport)
    settings.setdefault("client_id", cfg.holder_id)
    transport = make_transport(settings, default_client_id=cfg.holder_id)
    state = cfg.path(str(cfg.keyholder.get("state", "state.json")))
    service = KeyholderService(
        member,
        transport,
        state_path=state,
        witness_grace_s=float(cfg.keyholder.get("witness_grace_s", 60.0)),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    print(
        f"{cfg.holder_id} serving federation {member.federation} "
        f"(member {member.share.index} of {member.manifest.size}, "
        f"threshold {member.manifest.threshold})",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        service.close()
    return 0
