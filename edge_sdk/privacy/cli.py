"""``edgefl privacy``: calibrate noise for a policy and report a device's spend."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _cmd_report(args: argparse.Namespace) -> int:
    from edge_sdk.cli import EXIT_OK, emit
    from edge_sdk.privacy._spec import NoiseSpec
    from edge_sdk.privacy.accounting import cost_of, gaussian_noise_multiplier, pld_epsilon
    from edge_sdk.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.open_existing(args.ledger)
    central = ledger.spent("central")
    local = ledger.spent("local")
    pld: float | None = None
    pld_note = "dp-accounting not installed"
    multipliers: dict[float, int] = {}
    complete = True
    extras = 0
    for e in ledger.entries:
        if e.noise is None:
            complete = False
            continue
        spec = NoiseSpec.from_dict(e.noise)
        if e.cost.to_dict() != cost_of(spec).to_dict():
            extras += 1  # the charge includes extra slots (evaluation, adaptive clipping)
        z = gaussian_noise_multiplier(spec)
        multipliers[z] = multipliers.get(z, 0) + 1
    if not ledger.entries:
        pld_note = "no rounds recorded"
    elif not complete:
        pld_note = "some entries carry no noise spec"
    elif extras:
        # The PLD estimate is built from the model noise alone; it would leave
        # out what the extra slots cost, i.e. understate the spend.
        pld_note = (
            f"{extras} entries also charge extra slots (evaluation, adaptive clipping): "
            "no PLD estimate, see the central figure"
        )
    else:
        pld = pld_epsilon(sorted(multipliers.items()), ledger.delta)
        if pld is not None:
            pld_note = "continuous-Gaussian PLD estimate (tighter; not the budget figure)"
    data: dict[str, Any] = {
        "ledger": str(ledger.path),
        "rounds": len(ledger.entries),
        "delta": ledger.delta,
        "budget_epsilon": ledger.budget_epsilon,
        "central_epsilon": central,
        "local_epsilon": local,
        "remaining_epsilon": ledger.remaining(),
        "pld_epsilon": pld,
        "pld_note": pld_note,
        "entries_with_extra_slots": extras,
        "last_round": ledger.entries[-1].round_key if ledger.entries else None,
    }
    lines = [
        f"ledger            {data['ledger']}",
        f"rounds recorded   {data['rounds']}",
        f"budget            epsilon {ledger.budget_epsilon:.4g} at delta {ledger.delta:.3g}",
        f"spent (central)   epsilon {central:.4f}   (released aggregates; device bound)",
        f"spent (local)     epsilon {local:.4f}   (one update on its own)",
        f"remaining         epsilon {ledger.remaining():.4f}",
        f"PLD estimate      {'n/a' if pld is None else f'epsilon {pld:.4f}'}   ({pld_note})",
    ]
    emit(data, as_json=args.json, text="\n".join(lines))
    return EXIT_OK


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from edge_sdk.cli import EXIT_OK, emit
    from edge_sdk.errors import ConfigError
    from edge_sdk.privacy._spec import DPPolicy
    from edge_sdk.privacy.accounting import privacy_report
    from edge_sdk.privacy.calibration import calibrate

    try:
        policy = DPPolicy(
            mode=args.mode,
            epsilon=args.epsilon,
            delta=args.delta,
            rounds=args.rounds,
            clip=args.clip,
            min_clients=args.min_clients if args.mode == "distributed" else 1,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    spec = calibrate(policy, scale=args.scale, dimension=args.dimension)
    report = privacy_report(spec, policy.rounds, with_pld=args.pld)
    data = {"noise_spec": spec.to_dict(), "sigma": spec.sigma, "report": report.to_dict()}
    pld = report.pld_epsilon
    lines = [
        f"mode              {spec.mode}"
        + (f" (sums of >= {spec.min_clients} devices)" if spec.mode == "distributed" else ""),
        f"per-device sigma  {spec.sigma:.6g} quantization units "
        f"(sigma^2 = {spec.sigma2_num}/{spec.sigma2_den})",
        f"norm bound        {spec.norm_bound:.6g} units (clip {spec.clip} x scale {spec.scale},"
        f" d = {spec.dimension}, with rounding)",
        f"central epsilon   {report.central_epsilon:.4f} after {policy.rounds} rounds "
        f"(target {policy.epsilon}, delta {policy.delta:.3g})",
        f"local epsilon     {report.local_epsilon:.4f} (one update on its own)",
    ]
    if pld is not None:
        lines.append(f"PLD estimate      {pld:.4f} (continuous-Gaussian, tighter)")
    emit(data, as_json=args.json, text="\n".join(lines))
    return EXIT_OK


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``privacy`` subcommands (``report``, ``calibrate``) to ``parser``."""
    sub = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")

    rep = sub.add_parser("report", help="print the privacy budget a device has spent")
    rep.add_argument("--ledger", required=True, metavar="FILE", help="the device's ledger file")
    rep.add_argument("--json", action="store_true", help="print JSON")
    rep.set_defaults(func=_cmd_report)

    cal = sub.add_parser("calibrate", help="compute the noise for a privacy target")
    cal.add_argument("--epsilon", type=float, required=True, help="total epsilon per device")
    cal.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    cal.add_argument("--rounds", type=int, required=True, help="max participations per device")
    cal.add_argument("--mode", choices=("local", "distributed"), default="distributed")
    cal.add_argument("--clip", type=float, required=True, help="L2 clip C of the delta")
    cal.add_argument("--scale", type=float, required=True, help="quantization units per 1.0")
    cal.add_argument("--dimension", type=int, required=True, help="number of model parameters")
    cal.add_argument(
        "--min-clients", type=int, default=10, help="distributed: devices per sum (default 10)"
    )
    cal.add_argument("--pld", action="store_true", help="also print dp-accounting's PLD figure")
    cal.add_argument("--json", action="store_true", help="print JSON")
    cal.set_defaults(func=_cmd_calibrate)
