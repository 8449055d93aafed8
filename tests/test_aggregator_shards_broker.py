"""A round over a root and two aggregator workers, each its own process, through Mosquitto.

The same harness as ``edgefl bench scale`` (``benchmarks/scale.py``): a real
2-of-3 committee in three ``edgefl keyholder serve`` processes, ``edgefl
aggregator serve`` as the root and ``serve --worker K`` as each worker, real
signed and encrypted updates. Every receipt is checked, every worker's store
read, and the committee's released sum compared with the exact sum of every
device's vector: ``lost`` and ``double_counted`` must be 0.

The SIGKILL tests kill one process at a named step (``EDGEFL_CRASH_AT``) and
start it again, as a supervisor would; the round must still complete with
nothing lost and nothing counted twice, and the kill must have happened.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefl_benchmarks.scale import _scenario

pytestmark = pytest.mark.broker

DEVICES = 40


def _run(tmp_path: Path, crash: dict[str, str] | None = None) -> dict[str, object]:
    return _scenario(
        tmp_path / "round",
        devices=DEVICES,
        commit_batch=64,
        seed=5,
        timeout_s=120.0,
        workers=2,
        crash=crash,
        resend_s=2.0,
    )


def _check(result: dict[str, object]) -> None:
    assert result["round_done"] and result["sum_exact"], result
    assert result["lost"] == 0 and result["double_counted"] == 0, result
    assert result["receipts"] == DEVICES == result["accepted_rows"], result
    assert result["bad_receipts"] == 0, result


@pytest.mark.timeout(180)
def test_a_round_over_two_workers_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    result = _run(tmp_path)
    _check(result)
    assert result["workers"] == 2 and result["restarts"] == {}


# Every step a worker or the root passes in a round (docs/operations.md lists them).
WORKER_STEPS = [
    "init_before_commit:1",  # adopting the first round
    "init_after_commit:1",
    "accept_queued:3",  # an update in the open batch: nothing durable, nothing sent
    "batch_before_commit:1",
    "batch_after_commit:1",  # durable, no receipt sent, nothing acknowledged
    "batch_receipt_sent:2",  # part of a batch's receipts sent
    "accept_after_commit:5",
    "seal_before_commit:1",
    "seal_after_commit:1",  # sealed and durable, the partial sum not yet sent
]
ROOT_STEPS = [
    "after_start:1",
    "seal_before_commit:1",
    "seal_after_commit:1",  # the workers may not have seen the seal
    "close_before_commit:1",  # every sealed sum in, nothing combined durably
    "close_after_commit:1",
    "before_decrypt:1",
    "result_before_commit:1",
    "result_after_commit:1",
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("step", WORKER_STEPS)
def test_a_worker_killed_at_each_step_loses_nothing(tmp_path: Path, step: str) -> None:
    result = _run(tmp_path, {"worker-0": step})
    assert result["restarts"] == {"worker-0": 1}, result  # the kill happened
    _check(result)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("step", ROOT_STEPS)
def test_the_root_killed_at_each_step_loses_nothing(tmp_path: Path, step: str) -> None:
    result = _run(tmp_path, {"root": step})
    assert result["restarts"] == {"root": 1}, result
    _check(result)
