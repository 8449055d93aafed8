"""Utility study: accuracy of float FedAvg, HE-only and HE + distributed DP.

``edgefl bench utility --json FILE`` runs :func:`firmware_sim.study.full_plan`
(digits with 20 and 50 devices, the synthetic ``sensor`` task with 1,000
devices; about 15 minutes of CPU, plus the strategy rows: FedProx, FedYogi
and FedAdagrad on the digits fleets, float and at epsilon 8); ``--quick``
runs a tiny plan in seconds
(figures meaningless, structure identical). Every setting is tuned on the
validation split and reported on the test split; see docs/results.md for
the grids, the selection rule and the results.
"""

from __future__ import annotations

import sys
from typing import Any


def _say(line: str) -> None:
    print(f"utility: {line}", file=sys.stderr, flush=True)


def run(quick: bool) -> dict[str, Any]:
    """Run the study (the quick plan with ``quick``) and return rows and targets."""
    from firmware_sim.study import full_plan, quick_plan, run_study

    plan = quick_plan() if quick else full_plan()
    return run_study(plan, progress=None if quick else _say)


def extend(path: str, out: str) -> dict[str, Any]:
    """Add the dp_adaptive rows and federated-evaluation runs to the published study at ``path``.

    ``python -m benchmarks.utility --extend docs/results-utility.json --out FILE``: the
    earlier stages' winners are read from the file (see
    :func:`firmware_sim.study.extend_study`), the new settings tuned and
    tested with the full plan's grids and seeds.
    """
    import json

    from firmware_sim.study import extend_study, full_plan

    with open(path, encoding="utf-8") as fh:
        published = json.load(fh)
    figures = extend_study(published, full_plan(), progress=_say)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(figures, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return figures


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=extend.__doc__)
    parser.add_argument("--extend", required=True, help="the published study JSON")
    parser.add_argument("--out", required=True, help="where to write the extended JSON")
    args = parser.parse_args()
    extend(args.extend, args.out)
