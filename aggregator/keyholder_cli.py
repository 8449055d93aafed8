"""``edgefl keyholder serve``: one committee member as its own MQTT service."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

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


def register_ceremony(sub: Any) -> None:
    """Add ``ceremony`` to the ``edgefl keys`` group (its subparsers action ``sub``)."""
    cer = sub.add_parser(
        "ceremony",
        help="generate the federation key as T-of-N key-holder shares (no whole secret key)",
        description=(
            "Generate the federation's Paillier key with safe primes and split the secret "
            "into N threshold shares: any T holders together decrypt a sum, T - 1 learn "
            "nothing. Writes the public key, the public committee manifest and one folder "
            "per holder (sealed share, Ed25519 identity, keyholder.toml). The primes are "
            "forgotten when the command ends; run it on a trusted, offline machine."
        ),
    )
    cer.add_argument("--out", required=True, metavar="DIR", help="output directory")
    cer.add_argument("--federation", required=True, help="federation name")
    cer.add_argument("--holders", type=int, default=3, help="N: committee members (default 3)")
    cer.add_argument(
        "--threshold", type=int, default=2, help="T: members needed to decrypt (default 2)"
    )
    cer.add_argument(
        "--bits",
        type=int,
        default=3072,
        choices=(2048, 3072, 4096),
        help='modulus size (default 3072, the 128-bit level: docs/keys.md "Which size")',
    )
    cer.add_argument(
        "--min-clients",
        type=int,
        default=10,
        help="the policy's quorum: noise is calibrated for sums of this many devices, and no "
        "holder decrypts fewer (default 10)",
    )
    pol = cer.add_argument_group(
        "federation policy", "the privacy promise every member signs and every device pins"
    )
    pol.add_argument("--mode", choices=("distributed", "local", "none"), default="distributed")
    pol.add_argument("--epsilon", type=float, default=8.0, help="per-device epsilon budget (8)")
    pol.add_argument("--delta", type=float, default=1e-5, help="per-device delta (1e-5)")
    pol.add_argument("--rounds", type=int, default=100, help="rounds horizon (100)")
    pol.add_argument("--max-clip", type=float, default=1.0, help="largest L2 clip (1.0)")
    pol.add_argument(
        "--min-clip", type=float, default=None, help="smallest L2 clip (default: no floor)"
    )
    pol.add_argument(
        "--adaptive-clip",
        action="store_true",
        help="allow adaptive clipping between --min-clip and --max-clip",
    )
    pol.add_argument(
        "--no-binding",
        action="store_true",
        help="publish no DJN base: updates carry no proof of plaintext knowledge "
        "(cancellation and copies are then NOT defended; development only)",
    )
    cer.add_argument(
        "--registry",
        default="../../registry.json",
        help="device registry path written into each keyholder.toml (relative to its folder)",
    )
    cer.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker URL for members")
    cer.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="seal the shares with FILE's first line (default: $EDGEFL_KEY_PASSPHRASE)",
    )
    cer.add_argument(
        "--insecure-unencrypted",
        action="store_true",
        help="store the shares WITHOUT encryption (still mode 0600; development only)",
    )
    cer.add_argument("--force", action="store_true", help="replace an existing ceremony")
    cer.add_argument("--json", action="store_true", help="print the result as JSON")
    cer.set_defaults(func=_cmd_ceremony)


def _cmd_ceremony(args: argparse.Namespace) -> int:
    # The ceremony is a server-side tool; it lives with the key holders.
    from aggregator.committee import commit_quorum
    from aggregator.keyholder_config import PolicyTerms, run_ceremony
    from edge_sdk.cli import emit
    from edge_sdk.crypto.keyfile import read_passphrase
    from edge_sdk.errors import ConfigError

    if not 1 <= args.threshold <= args.holders:
        raise ConfigError(
            f"need 1 <= --threshold <= --holders, got {args.threshold} of {args.holders}"
        )
    passphrase = None
    if not args.insecure_unencrypted:
        passphrase = read_passphrase(args.passphrase_file)
        if passphrase is None:
            raise ConfigError(
                "a passphrase is required to seal the shares: set EDGEFL_KEY_PASSPHRASE or "
                "--passphrase-file (or --insecure-unencrypted for development)"
            )
    print(
        f"generating a {args.bits}-bit key from safe primes for {args.holders} holders "
        f"(threshold {args.threshold}); this takes seconds (2048) to a minute (3072)...",
        file=sys.stderr,
        flush=True,
    )
    data = run_ceremony(
        Path(args.out),
        federation=args.federation,
        holders=args.holders,
        threshold=args.threshold,
        bits=args.bits,
        passphrase=passphrase.encode() if passphrase is not None else None,
        insecure_unencrypted=args.insecure_unencrypted,
        min_clients=args.min_clients,
        registry=args.registry,
        broker_url=args.broker,
        terms=PolicyTerms(
            mode=args.mode,
            min_clients=args.min_clients,
            epsilon=args.epsilon,
            delta=args.delta,
            rounds=args.rounds,
            max_clip=args.max_clip,
            binding=not args.no_binding,
            min_clip=args.min_clip,
            adaptive_clip=args.adaptive_clip,
        ),
        overwrite=args.force,
    )
    quorum = commit_quorum(args.holders, args.threshold)  # members online for a round
    data["commit_quorum"] = quorum
    data["members_may_be_offline"] = args.holders - quorum
    if args.holders - quorum == 0 and args.holders > 1:
        print(
            f"note: a {args.threshold}-of-{args.holders} committee closes rounds only while "
            f"all {args.holders} members are online (commit quorum {quorum}); choose "
            f"--holders >= --threshold + 2 (e.g. {args.threshold}-of-{args.threshold + 2}) "
            "if a member may be down during rounds",
            file=sys.stderr,
        )
    members = "\n".join(f"    {m}" for m in data["members"])
    text = (
        f"{args.threshold}-of-{args.holders} committee for federation {args.federation} "
        f"({data['ceremony_s']:.1f} s)\n"
        f"  key fingerprint:       {data['key_fingerprint']}\n"
        f"  committee fingerprint: {data['committee_fingerprint']}\n"
        f"  public key:  {data['public_key']}  (devices and the aggregator)\n"
        f"  manifest:    {data['manifest']}  (public: aggregator and every holder)\n"
        f"  policy:      {data['policy']}  (signed by every holder; devices pin "
        f"{data['policy_digest'][:16]}...)\n"
        f"  availability: rounds close while {quorum} of {args.holders} members are online "
        f"({args.holders - quorum} may be down)\n"
        f"  holder folders (hand each to a different operator; no whole secret key exists):\n"
        f"{members}"
    )
    emit(data, as_json=args.json, text=text)
    return 0


def _approve(args: argparse.Namespace) -> int:
    from aggregator.keyholder_config import load_keyholder_config
    from edge_sdk.cli import emit
    from edge_sdk.errors import ConfigError
    from edge_sdk.identity import DeviceIdentity, DeviceRegistry

    cfg = load_keyholder_config(args.config)
    identity = DeviceIdentity.load(cfg.path(cfg.keyholder.identity))
    if identity.device_id != cfg.holder_id:
        raise ConfigError(f"identity key belongs to {identity.device_id}, not {cfg.holder_id}")
    path = args.registry or cfg.path(cfg.keyholder.registry)
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
    manifest = CommitteeManifest.load(cfg.path(cfg.keyholder.manifest))
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
    settings = dict(cfg.broker)
    settings.setdefault("client_id", cfg.holder_id)
    transport = make_transport(settings, default_client_id=cfg.holder_id)
    state = cfg.path(cfg.keyholder.state)
    service = KeyholderService(
        member,
        transport,
        state_path=state,
        witness_grace_s=cfg.keyholder.witness_grace_s,
        relay_idle_s=cfg.keyholder.relay_idle_s,
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
