"""``edgefl status``: the current round, its contributors and rejections, from the store."""

from __future__ import annotations

import argparse
from typing import Any

from edge_sdk.cli import emit

__all__ = ["register"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``--store`` and ``--json``."""
    parser.add_argument("--store", required=True, help="the aggregator's SQLite store")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_status)


def _text(s: dict[str, Any]) -> str:
    lines = [f"federation {s.get('federation')}  store {s['store']}"]
    rnd = s.get("round")
    if rnd:
        lines.append(
            f"round {rnd['round_id']}: {rnd['phase']}"
            + (f" ({rnd['outcome']})" if rnd["outcome"] else "")
            + f", {len(rnd['contributors'])} contributors (quorum {rnd['min_clients']}),"
            f" deadline in {rnd['seconds_to_deadline']} s"
        )
        if rnd["contributors"]:
            lines.append("  contributors: " + ", ".join(rnd["contributors"]))
        if rnd["rejections"]:
            lines.append(
                "  rejections: "
                + ", ".join(f"{k}={v}" for k, v in sorted(rnd["rejections"].items()))
            )
    model = s.get("model")
    if model:
        lines.append(f"model version {model['version']} (round {model['round_id']})")
    lines.append(f"rounds done {s['rounds_done']}, failed {len(s['rounds_failed'])}")
    for fed in s.get("federated", [])[-5:]:
        parts = []
        if fed.get("accuracy") is not None:
            parts.append(
                f"federated accuracy {fed['accuracy']:.4f} loss {fed['loss']:.4g} "
                f"on ~{fed['examples']:.0f} held-out examples"
            )
        if fed.get("clip_fraction") is not None:
            parts.append(f"unclipped {fed['clip_fraction']:.2f}")
        lines.append(f"  round {fed['round_id']}: " + ", ".join(parts) + " (DP-noised)")
    if s["rejections_total"]:
        lines.append(
            "rejections (all rounds): "
            + ", ".join(f"{k}={v}" for k, v in sorted(s["rejections_total"].items()))
        )
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    from aggregator.store import AggregatorStore

    store = AggregatorStore(args.store, readonly=True)
    try:
        data = store.status()
    finally:
        store.close()
    emit(data, as_json=args.json, text=_text(data))
    return 0
