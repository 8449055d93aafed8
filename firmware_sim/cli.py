"""``edgefl sim``: simulate a fleet and write a JSON summary and a PNG report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_sdk.cli import EXIT_OK, emit, write_json

__all__ = ["register"]


def _config(args: argparse.Namespace) -> Any:
    from firmware_sim.engine import SimConfig

    try:
        return SimConfig(
            dataset=args.dataset,
            model=args.model,
            hidden=args.hidden,
            devices=args.devices,
            rounds=args.rounds,
            partition=args.partition,
            alpha=args.alpha,
            setting=args.setting,
            epsilon=args.epsilon,
            delta=args.delta,
            clip=args.clip,
            crypto=args.crypto == "on",
            participation=args.participation,
            dropout=args.dropout,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            prox_mu=args.prox_mu,
            server_lr=args.server_lr,
            server_opt=args.server_opt,
            min_clients=args.min_clients,
            seed=args.seed,
            evaluate_every=args.evaluate_every,
        )
    except ValueError as exc:
        from edge_sdk.errors import ConfigError

        raise ConfigError(str(exc)) from None


def _cmd_run_fleet(args: argparse.Namespace) -> int:
    """Full stack over a broker: real agents, aggregator service, key holder."""
    import tempfile

    from edge_sdk.errors import ConfigError
    from firmware_sim.fleet import DeviceProfile, Fleet, FleetConfig
    from firmware_sim.report import plot_rounds

    if args.setting in ("float", "dp_adaptive") or args.crypto == "off":
        raise ConfigError("--broker runs the real stack: use --setting dp or he with crypto on")
    password = _broker_password(args)
    try:
        profile = DeviceProfile(
            slowdown=args.slowdown,
            availability=args.availability,
            reboot_prob=args.reboot_prob,
            link_latency_ms=args.link_latency_ms,
        )
        config = FleetConfig(
            devices=args.devices,
            rounds=args.rounds,
            dataset=args.dataset,
            model=args.model,
            hidden=args.hidden,
            partition=args.partition,
            alpha=args.alpha,
            privacy=args.setting,
            evaluate_every=args.evaluate_every,
            epsilon=args.epsilon,
            delta=args.delta,
            clip=args.clip,
            min_clients=args.min_clients,
            round_duration_s=args.round_duration,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            prox_mu=args.prox_mu,
            server_opt=args.server_opt,
            server_lr=args.server_lr,
            broker=args.broker,
            mqtt=_MQTT_VERSIONS[args.mqtt] if args.mqtt else None,
            username=args.username,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            broker_max_packet_size=args.broker_max_packet_size,
            holders=args.holders,
            threshold=args.threshold,
            profile=profile,
            seed=args.seed,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    quiet = args.json == "-"

    def progress(kind: str, data: dict[str, Any]) -> None:
        if quiet:
            return
        if kind == "setup":
            print(f"  ... {data['step']}", flush=True)
        elif kind == "round":
            eps = f", epsilon {data['epsilon']:.2f}" if data["epsilon"] else ""
            print(
                f"round {data['round']:>3}/{config.rounds}: {data['contributors']:>4}/"
                f"{data['expected']} updates, accuracy {100 * data['accuracy']:5.1f}%{eps}, "
                f"{data['seconds']:.1f} s",
                flush=True,
            )

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="edgefl-sim-"))
    result = Fleet(config, workdir, progress=progress, password=password).run()
    summary = result.to_json()
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", summary)
        plot_rounds(
            out / "report.png",
            summary["per_round"],
            title=f"{config.devices} devices over {result.broker}, {config.model} on "
            f"{config.dataset}, {config.privacy}",
        )
    if args.json:
        write_json(args.json, summary)
    if not quiet:
        print(
            f"final accuracy {100 * (summary['final_accuracy'] or 0):.1f}% in "
            f"{result.seconds:.1f} s; reboots {result.reboots}; rejections {result.rejections}"
        )
    return EXIT_OK


_MQTT_VERSIONS = {"5": 5, "3.1.1": 311, "311": 311}
PASSWORD_ENV = "EDGEFL_BROKER_PASSWORD"


def _broker_password(args: argparse.Namespace) -> str | None:
    """The broker password from ``--password-file`` or ``$EDGEFL_BROKER_PASSWORD``.

    Never from the command line, where other users see it in the process list.
    """
    import os

    from edge_sdk.errors import ConfigError

    if args.password_file:
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --password-file: {exc}") from None
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigError(f"--password-file {args.password_file} is empty")
    else:
        password = os.environ.get(PASSWORD_ENV) or ""
    if password and not args.username:
        raise ConfigError("a broker password needs --username")
    if args.username and not password:
        raise ConfigError(f"--username needs --password-file or ${PASSWORD_ENV}")
    return password or None


def _cmd_run(args: argparse.Namespace) -> int:
    from firmware_sim.engine import RoundResult, run

    if args.broker != "none":
        return _cmd_run_fleet(args)
    given = [
        flag
        for flag, value in (
            ("--mqtt", args.mqtt),
            ("--username", args.username),
            ("--password-file", args.password_file),
            ("--tls-ca", args.tls_ca),
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
            ("--broker-max-packet-size", args.broker_max_packet_size),
        )
        if value is not None
    ]
    if given:
        from edge_sdk.errors import ConfigError

        raise ConfigError(f"{', '.join(given)} need --broker (the direct engine has none)")
    config = _config(args)
    quiet = args.json == "-"

    def progress(r: RoundResult) -> None:
        if not quiet:
            eps = f", epsilon {r.epsilon:.2f}" if r.epsilon else ""
            if r.fed_accuracy is not None:
                eps += f", federated eval {100 * r.fed_accuracy:5.1f}%"
            if config.setting == "dp_adaptive" and r.clip is not None:
                eps += f", clip {r.clip:.3g}"
            late = f", {r.late} late" if r.late else ""
            outcome = "" if r.outcome == "ok" else f" [{r.outcome}: model unchanged]"
            print(
                f"round {r.round:>3}/{config.rounds}: {r.contributors:>4}/{config.devices} "
                f"updates{late}, accuracy {100 * r.accuracy:5.1f}%{eps}, {r.seconds:.1f} s"
                f"{outcome}",
                flush=True,
            )

    if not quiet:
        print(
            f"simulating {config.devices} devices x {config.rounds} rounds: {config.model} on "
            f"{config.dataset} ({config.partition}), setting {config.setting}, crypto "
            f"{'on' if config.crypto else 'off (unblinded ciphertexts)'}, quorum "
            f"{config.quorum}; noise from the OS CSPRNG",
            flush=True,
        )
    result = run(config, progress=progress)
    summary = result.to_json()
    if args.report:
        from firmware_sim.report import plot_rounds

        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", summary)
        plot_rounds(
            out / "report.png",
            summary["rounds"],
            title=f"{config.devices} devices, {config.model} on {config.dataset}, "
            f"{config.setting}"
            + (f" (epsilon {config.epsilon})" if config.setting in ("dp", "dp_adaptive") else ""),
        )
        if not quiet:
            print(f"report: {out / 'report.png'}, {out / 'summary.json'}")
    if args.json:
        write_json(args.json, summary)
    if not quiet:
        emit(
            summary,
            as_json=False,
            text=f"final accuracy {100 * result.final_accuracy:.1f}% in {result.seconds:.1f} s"
            + (f"; {result.failed_rounds} rounds failed" if result.failed_rounds else ""),
        )
    return EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``sim`` subcommands to ``parser``."""
    from aggregator.optimizers import OPTIMIZERS
    from firmware_sim.datasets import DATASETS
    from firmware_sim.engine import MODELS, SETTINGS

    sub = parser.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    run = sub.add_parser(
        "run",
        help="simulate a fleet (direct: the real round machine and device code, no broker)",
        description="Simulate N devices: each runs the SDK's device session, training and "
        "privacy pipeline and its own privacy ledger; the aggregator's real round machine "
        "(quorum, deadline, optimizer) and a 2-of-3 key-holder committee run the rounds in "
        "memory. --crypto off "
        "(default) sends unblinded ciphertexts (fast, not hiding); --crypto on encrypts for "
        "real (identical aggregates, slower).",
    )
    run.add_argument("--dataset", choices=DATASETS, default="digits")
    run.add_argument("--model", choices=MODELS, default="softmax")
    run.add_argument("--hidden", type=int, default=32, help="hidden units of onnx-mlp")
    run.add_argument("--devices", type=int, default=20)
    run.add_argument("--rounds", type=int, default=10)
    run.add_argument("--partition", choices=("iid", "dirichlet", "quantity"), default="dirichlet")
    run.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    run.add_argument(
        "--setting",
        choices=SETTINGS,
        default="dp",
        help="float FedAvg, HE-only, HE + distributed DP, or DP with adaptive clipping",
    )
    run.add_argument("--epsilon", type=float, default=8.0)
    run.add_argument("--delta", type=float, default=1e-5)
    run.add_argument("--clip", type=float, default=1.0, help="L2 clip of a device's delta")
    run.add_argument("--crypto", choices=("on", "off"), default="off")
    run.add_argument("--participation", type=float, default=1.0)
    run.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="share of the online devices whose update arrives after the deadline",
    )
    run.add_argument("--local-epochs", type=int, default=1)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--lr", type=float, default=0.1, help="device learning rate")
    run.add_argument("--server-lr", type=float, default=1.0)
    run.add_argument("--server-opt", choices=sorted(OPTIMIZERS), default="fedavg")
    run.add_argument(
        "--prox-mu",
        type=float,
        default=0.0,
        help="FedProx proximal coefficient announced to the devices (0: off)",
    )
    run.add_argument("--min-clients", type=int, help="quorum (default: half the expected)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--evaluate-every",
        type=int,
        default=0,
        help="federated evaluation every N rounds on each device's held-out data (0: off)",
    )
    stack = run.add_argument_group(
        "full stack over a broker",
        "With --broker, every device is a real agent with its own MQTT connection, ledger and "
        "outbox, talking to the real aggregator service and a T-of-N committee of key "
        "holders, each its own process on the broker (tens of devices).",
    )
    stack.add_argument("--holders", type=int, default=3, help="key holders N (default 3)")
    stack.add_argument(
        "--threshold", type=int, default=2, help="shares needed to decrypt, T (default 2)"
    )
    stack.add_argument(
        "--broker",
        default="none",
        help="none (direct simulation, default) | auto | mosquitto | embedded | rabbitmq | "
        "nats (3-node cluster) | mqtt[s]://host:port[,mqtt[s]://host:port...] (the nodes of "
        "one cluster: parties are spread over them and fail over)",
    )
    stack.add_argument(
        "--mqtt",
        choices=("5", "3.1.1"),
        help="MQTT version of every party (default: 5, or 3.1.1 for harness brokers without 5)",
    )
    stack.add_argument("--username", help="broker user name of every party")
    stack.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"file holding the broker password (else ${PASSWORD_ENV}; never on the command line)",
    )
    stack.add_argument("--tls-ca", metavar="PEM", help="CA of the broker certificate (mqtts://)")
    stack.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    stack.add_argument("--tls-key", metavar="PEM", help="client certificate key")
    stack.add_argument(
        "--broker-max-packet-size",
        type=int,
        metavar="BYTES",
        help="the broker's packet limit, for brokers that cannot announce it (MQTT 3.1.1)",
    )
    stack.add_argument(
        "--availability", type=float, default=1.0, help="probability a device takes part in a round"
    )
    stack.add_argument(
        "--reboot-prob",
        type=float,
        default=0.0,
        help="probability of a reboot between storing an update and its receipt",
    )
    stack.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="CPU slowdown factor of every device (a Pi 4 is ~3-6x)",
    )
    stack.add_argument(
        "--link-latency-ms",
        type=float,
        default=0.0,
        help="one-way latency added by the fault proxy",
    )
    stack.add_argument("--round-duration", type=float, default=60.0, help="round deadline, s")
    stack.add_argument("--workdir", help="keep keys, store and device state here")
    run.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-' = stdout)")
    run.add_argument("--report", metavar="DIR", help="write summary.json and report.png here")
    run.set_defaults(func=_cmd_run)
