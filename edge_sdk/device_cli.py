"""``edgefl device``: enroll, run and inspect a device agent."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_sdk.cli import EXIT_FAILURE, EXIT_OK, emit
from edge_sdk.errors import ConfigError

__all__ = ["build_model", "register"]


def build_model(training: dict[str, Any]) -> Any:
    """Build the local model named by a config's ``[training]`` section.

    Raises:
        ConfigError: unknown model kind or missing settings.
    """
    from edge_sdk.models import LinearRegression, LogisticRegression, OnnxModel, SoftmaxRegression

    kind = training.get("model", "softmax")
    try:
        if kind == "onnx":
            trainable = training.get("trainable")
            return OnnxModel.from_file(
                training["onnx_path"],
                trainable=trainable,
                loss=training.get("loss", "softmax_cross_entropy"),
            )
        features = int(training["features"])
        if kind == "softmax":
            return SoftmaxRegression(features, int(training["classes"]))
        if kind == "logistic":
            return LogisticRegression(features)
        if kind == "linear":
            return LinearRegression(features)
    except KeyError as exc:
        raise ConfigError(f"[training] model {kind!r} needs {exc.args[0]!r}") from None
    raise ConfigError(f"[training] model must be softmax, logistic, linear or onnx, got {kind!r}")


def _load_data(path: str | Path) -> tuple[Any, Any]:
    import numpy as np

    try:
        with np.load(path) as data:
            return data["x"], data["y"]
    except FileNotFoundError:
        raise ConfigError(f"[training] data file {path} does not exist") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ConfigError(f"[training] data {path} must be an .npz with x and y: {exc}") from None


def _cmd_enroll(args: argparse.Namespace) -> int:
    from edge_sdk.identity import DeviceIdentity, DeviceRegistry

    key_path = Path(args.state_dir) / "device.key"
    if key_path.exists():
        identity = DeviceIdentity.load(key_path)
        if identity.device_id != args.id:
            raise ConfigError(f"{key_path} belongs to device {identity.device_id!r}")
    else:
        identity = DeviceIdentity.generate(args.id)
        identity.save(key_path)
    result: dict[str, Any] = {
        "device_id": args.id,
        "key_file": str(key_path),
        "public_key": identity.public_key_bytes.hex(),
    }
    if args.registry:
        registry = DeviceRegistry.load(args.registry, create=True)
        registry.federation = args.federation or registry.federation
        try:
            registry.enroll(args.id, identity.public_key_bytes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        registry.save()
        result["registry"] = str(args.registry)
    extra = ""
    if args.policy:
        from edge_sdk._fs import atomic_write
        from edge_sdk.policy import FederationPolicy

        policy = FederationPolicy.load(args.policy)  # checks the committee's signatures
        pin = Path(args.state_dir) / "policy.pin"
        if pin.exists() and pin.read_text(encoding="utf-8").strip() != policy.digest:
            raise ConfigError(
                f"{pin} pins another policy; a changed policy is a new ceremony step: "
                "remove the pin deliberately to accept it"
            )
        atomic_write(pin, (policy.digest + "\n").encode(), mode=0o644)
        result["policy_digest"] = policy.digest
        extra = (
            f"\npinned federation policy {policy.digest[:16]}... ({policy.mode}, epsilon "
            f"{policy.epsilon}, quorum {policy.min_clients}); set [keys] policy = "
            f'"{args.policy}" in device.toml'
        )
    emit(
        result,
        as_json=args.json,
        text=f"enrolled {args.id}: key {key_path}"
        + (f", registered in {args.registry}" if args.registry else "")
        + f"\npublic key {result['public_key']}"
        + extra
        + (
            "\nthe device counts only once T key holders approved it: "
            f"`edgefl keyholder approve --config keyholder.toml --device {args.id}` on each"
            if args.registry
            else ""
        ),
    )
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    from edge_sdk.identity import DeviceRegistry

    registry = DeviceRegistry.load(args.registry)
    try:
        registry.revoke(args.id)
    except KeyError:
        raise ConfigError(f"device {args.id!r} is not in {args.registry}") from None
    registry.save()
    emit({"device_id": args.id, "revoked": True}, as_json=args.json, text=f"revoked {args.id}")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from edge_sdk.identity import DeviceRegistry

    registry = DeviceRegistry.load(args.registry)
    rows = [
        {
            "device_id": r.device_id,
            "active": r.active,
            "enrolled_ms": r.enrolled_ms,
            "revoked_ms": r.revoked_ms,
        }
        for r in registry.records()
    ]
    text = (
        "\n".join(f"{r['device_id']:<24} {'active' if r['active'] else 'REVOKED'}" for r in rows)
        or "no devices enrolled"
    )
    emit({"federation": registry.federation, "devices": rows}, as_json=args.json, text=text)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_sdk.agent import Outbox, load_device_config
    from edge_sdk.privacy import PrivacyLedger

    config = load_device_config(args.config)
    data: dict[str, Any] = {"device_id": config.device_id, "federation": config.federation}
    if config.ledger_file.exists():
        ledger = PrivacyLedger.open_existing(config.ledger_file)
        data["epsilon_spent"] = ledger.spent()
        data["epsilon_budget"] = ledger.budget_epsilon
        data["rounds"] = len(ledger.entries)
    outbox = Outbox(config.outbox_dir)
    data["outbox"] = [e.round_id for e in outbox.entries()]
    text = "\n".join(f"{k}: {v}" for k, v in data.items())
    emit(data, as_json=args.json, text=text)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_sdk.agent import ModelTrainer, Trainer, load_device_config, load_trainer, run_device

    config = load_device_config(args.config)
    trainer: Trainer
    spec = str(config.training.get("model", ""))
    if ":" in spec:  # package.module:factory named by this device's own config file
        trainer = load_trainer(spec, config.training)
    else:
        if "data" not in config.training:
            raise ConfigError("[training] data (an .npz with x and y) is required to run")
        x, y = _load_data(config.training["data"])
        trainer = ModelTrainer(build_model(config.training), x, y)
    return EXIT_OK if run_device(trainer, config) == 0 else EXIT_FAILURE


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``device`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="device_command", metavar="SUBCOMMAND")
    enroll = sub.add_parser("enroll", help="create a device key and register it")
    enroll.add_argument("--id", required=True, help="device id ([A-Za-z0-9_-]{1,64})")
    enroll.add_argument("--state-dir", required=True, type=Path, help="device state folder")
    enroll.add_argument("--registry", type=Path, help="aggregator's registry file to add it to")
    enroll.add_argument("--federation", help="federation name recorded in a new registry")
    enroll.add_argument(
        "--policy",
        type=Path,
        help="the committee-signed federation policy.json to pin on this device",
    )
    enroll.add_argument("--json", action="store_true", help="print the result as JSON")
    enroll.set_defaults(func=_cmd_enroll)
    revoke = sub.add_parser("revoke", help="revoke a device in the registry")
    revoke.add_argument("--id", required=True)
    revoke.add_argument("--registry", required=True, type=Path)
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=_cmd_revoke)
    lst = sub.add_parser("list", help="list enrolled devices")
    lst.add_argument("--registry", required=True, type=Path)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_list)
    status = sub.add_parser("status", help="privacy spend and pending updates of a device")
    status.add_argument("--config", required=True, type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    run = sub.add_parser("run", help="run the device agent until Ctrl-C / SIGTERM")
    run.add_argument("--config", required=True, type=Path, help="device.toml")
    run.set_defaults(func=_cmd_run)
