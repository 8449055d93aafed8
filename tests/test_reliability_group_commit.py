"""SIGKILL inside a group-commit batch on Mosquitto (issue 18), and the one-commit mode.

The scenario and every check are ``test_aggregator_mosquitto``'s (20 devices
resending until receipted, two rounds, bit-exact aggregates and model chain
after a restart); here the aggregator dies at the points that exist only with
group commit: an update queued in the open batch (accepted in memory, nothing
durable, nothing sent), just before and just after a batch's transaction,
and with part of a committed batch's receipts sent and none of its messages
acknowledged. The last case runs the old one-commit-per-update mode
(``commit_batch = 1``, the benchmark's baseline) through a kill too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from firmware_sim.broker import MosquittoBroker
from tests import test_aggregator_mosquitto as _scenario
from tests import test_aggregator_support as _support

keypair = _support.keypair  # session fixture

pytestmark = pytest.mark.broker


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("crash", "commit_batch"),
    [
        ("accept_queued:3", 64),
        ("batch_before_commit:2", 64),
        ("batch_after_commit:1", 64),
        ("batch_receipt_sent:2", 64),
        ("accept_after_commit:7", 1),
    ],
)
def test_kill9_inside_a_batch_gives_bit_exact_result(
    crash: str,
    commit_batch: int,
    keypair: Any,
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = _scenario._setup

    def with_commit_batch(*args: Any) -> Any:
        cfg, idents = setup(*args)
        text = cfg.read_text(encoding="utf-8")
        cfg.write_text(
            text.replace("tick_s = 0.1\n", f"tick_s = 0.1\ncommit_batch = {commit_batch}\n", 1),
            encoding="utf-8",
        )
        return cfg, idents

    monkeypatch.setattr(_scenario, "_setup", with_commit_batch)
    _scenario.test_kill9_at_each_transition_gives_bit_exact_result(
        crash, keypair, mosquitto, tmp_path
    )
