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
