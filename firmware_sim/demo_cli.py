"""``edgefl demo``: the one-command demo.

Starts a broker (Mosquitto when installed, else the embedded one), a 2-of-3
committee of key holders (one process each), the aggregator and 50 simulated
devices in this process; trains softmax regression on the digits data for 5
rounds with distributed DP (epsilon 8) and Paillier encryption;
prints each round's accuracy beside a centrally trained baseline; writes a
PNG and JSON report.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_sdk.cli import EXIT_OK, write_json

__all__ = ["register"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from firmware_sim.engine import SimConfig, central_baseline
    from firmware_sim.fleet import Fleet, FleetConfig
    from firmware_sim.report import plot_rounds

    # The utility study's choice for 50 devices at epsilon 8 (docs/results.md:
    # softmax regression, 10 local epochs at lr 0.3, FedAvg with server lr 8,
    # clip 0.3, 5 rounds); the quorum is 90% of the fleet.
    config = FleetConfig(
        devices=args.devices,
        rounds=args.rounds,
        epsilon=args.epsilon,
        delta=1e-5,
        model=args.model,
        clip=0.3,
        lr=0.3,
        local_epochs=10,
        server_lr=8.0,
        hidden=16,
        min_clients=max(1, int(0.9 * args.devices)),
        round_duration_s=60,
        broker=args.broker,
        holders=args.holders,
        threshold=args.threshold,
        seed=args.seed,
        evaluate_every=args.evaluate_every,
    )
    quiet = args.json == "-"

    def say(text: str = "", end: str = "\n") -> None:
        if not quiet:
            print(text, end=end, flush=True)

    say(
        f"edgefl demo: {config.devices} devices train "
        + (
            f"a {config.hidden}-unit ONNX MLP"
            if config.model == "onnx-mlp"
            else f"a {config.model} model"
        )
        + f" on the digits data (non-IID, Dirichlet {config.alpha}) for {config.rounds} rounds."
    )
    say(
        f"Each update is clipped (L2 {config.clip}), noised on the device (distributed DP, "
        f"epsilon {config.epsilon}, delta {config.delta}), packed, Paillier-encrypted "
        f"({config.key_bits}-bit) and signed;"
    )
    say(
        f"the aggregator sums ciphertexts blind; a {config.threshold}-of-{config.holders} "
        "committee of key holders (one process each) verifies each sum on its own and "
        f"releases decryption shares; only {config.threshold} shares together reveal the sum."
    )
    central = central_baseline(
        SimConfig(
            dataset=config.dataset,
            model=config.model,
            hidden=config.hidden,
            rounds=config.rounds,
            local_epochs=1,
            lr=0.1,
            seed=config.seed,
        )
    )
    say(f"Central (non-federated, non-private) baseline: {100 * central:.1f}% test accuracy.")
    tty = sys.stdout.isatty() and not quiet
    started = time.perf_counter()

    def progress(kind: str, data: dict[str, Any]) -> None:
        if kind == "setup":
            say(f"  ... {data['step']}")
        elif kind == "update" and tty:
            say(
                f"\r  round {data['round']:>2}/{config.rounds}: "
                f"{data['received']:>3}/{data['expected']} encrypted updates",
                end="",
            )
        elif kind == "round":
            prefix = "\r" if tty else ""
            say(
                f"{prefix}  round {data['round']:>2}/{config.rounds}: "
                f"{data['contributors']:>3}/{data['expected']} devices, accuracy "
                f"{100 * data['accuracy']:5.1f}% (central {100 * central:.1f}%), epsilon "
                f"{data['epsilon']:.2f}, {data['seconds']:.1f} s"
                + (
                    f"; federated evaluation {100 * data['fed_accuracy']:.1f}% (DP-noised)"
                    if data.get("fed_accuracy") is not None
                    else ""
                )
            )

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgefl-demo-"))
    result = Fleet(config, workdir, progress=progress).run()
    summary = result.to_json()
    summary["central_accuracy"] = central
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    write_json(report / "summary.json", summary)
    plot_rounds(
        report / "report.png",
        summary["per_round"],
        title=f"edgefl demo: {config.devices} devices, digits {config.model}, Paillier + "
        "distributed DP "
        f"(epsilon {config.epsilon}, delta {config.delta}), broker: {result.broker}",
        baseline=central,
    )
    if args.json:
        write_json(args.json, summary)
    say(
        f"Done in {summary['wall_s']} s: final accuracy {100 * summary['final_accuracy']:.1f}% "
        f"(central {100 * central:.1f}%), epsilon {summary['epsilon']:.2f} at delta "
        f"{config.delta}, {result.bytes_per_param:.2f} bytes/parameter on the wire, "
        f"broker {result.broker}."
    )
    total = sum(r["contributors"] for r in summary["per_round"])
    say(
        f"Who saw what: the broker and the aggregator saw {total} encrypted updates and "
        f"never a plaintext; each of the {config.holders} key holders saw the same "
        f"ciphertexts and released only shares of each round's sum (refusals: "
        f"{result.keyholder_refusals}); the sums are DP-noised (epsilon "
        f"{summary['epsilon']:.2f} spent per device)."
    )
    say(f"Report: {report / 'report.png'} and {report / 'summary.json'}")
    if config.devices < 50:
        say(
            f"Note: with only {config.devices} devices, device-level DP noise costs accuracy "
            "(and varies run to run: the noise comes from each device's OS randomness); "
            "larger fleets pay far less (docs/results.md)."
        )
    return EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` arguments to ``parser``."""
    parser.add_argument(
        "--devices",
        type=int,
        default=50,
        help="simulated devices (50; try 20 to see what DP costs a small fleet)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="training rounds (5)")
    parser.add_argument(
        "--model",
        choices=("softmax", "onnx-mlp"),
        default="softmax",
        help="softmax regression (default, the study's choice) or the 16-unit ONNX MLP",
    )
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP epsilon over all rounds")
    parser.add_argument(
        "--broker", default="auto", help="auto | mosquitto | embedded | mqtt://host:port"
    )
    parser.add_argument("--report", default="demo-report", help="report folder (demo-report)")
    parser.add_argument("--workdir", help="keep keys, store and device state here")
    parser.add_argument("--json", metavar="FILE", help="also write the summary here ('-' = stdout)")
    parser.add_argument("--holders", type=int, default=3, help="key holders N (3)")
    parser.add_argument("--threshold", type=int, default=2, help="shares needed T (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--evaluate-every",
        type=int,
        default=0,
        help="federated evaluation every N rounds on the devices' held-out data (0: off; "
        "it costs epsilon, see docs/privacy.md)",
    )
    parser.set_defaults(func=_cmd_demo)
