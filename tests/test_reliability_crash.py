"""Aggregator SIGKILL at round transitions, watched from the broker (issue 9, case 2).

``test_aggregator_mosquitto.py`` kills the aggregator at ten points and checks
the store (bit-exact aggregates and model chain). This file adds what only a
subscriber can see, and the one transition it does not reach (a round that
FAILS for lack of quorum, ``fail_after_commit``):

* round ids are never reused: every announcement seen for a round id is the
  same bytes, and round ids only grow;
* each model version is published with ONE digest (re-publishing after a
  restart repeats the same model, never a recomputed one);
* every completed round's decrypted aggregate equals the exact sum of its
  contributors' quantized vectors, and a failed round released nothing.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.rounds import round_outcome
from aggregator.store import AggregatorStore
from firmware_sim.broker import MosquittoBroker
from tests import test_aggregator_support as _support
from tests.reliability_helpers import (
    DeviceFleet,
    Observer,
    spawn_aggregator,
    wait_for,
    write_federation,
)

keypair = _support.keypair  # session fixture

pytestmark = pytest.mark.broker


@pytest.mark.timeout(240)
@pytest.mark.parametrize("crash", ["fail_after_commit:1", "result_after_commit:1"])
def test_crash_at_transition_never_reuses_a_round_or_republishes_a_different_model(
    keypair: Any, mosquitto: MosquittoBroker, tmp_path: Path, crash: str
) -> None:
    fed = write_federation(
        tmp_path / "agg",
        keypair,
        mosquitto.url,
        devices=6,
        min_clients=3,
        rounds=2,
        round_duration_s=4.0,
    )
    observer = Observer(mosquitto.url).start()
    # nobody answers round 1: it fails for lack of quorum at its deadline
    fleet = DeviceFleet(
        mosquitto.url,
        fed.public_key,
        fed.identities,
        dim=10,
        resend_s=1.0,
        participate=lambda round_id, device: round_id != 1,
    ).start()
    try:
        proc = spawn_aggregator(fed.config, crash)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == -9, out.decode(errors="replace")[-2000:]
        proc = spawn_aggregator(fed.config)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        wait_for(lambda: 2 in observer.distinct_models(), what="model v2 seen")
    finally:
        fleet.stop()
        observer.close()

    rounds = observer.distinct_rounds()
    assert all(len(v) == 1 for v in rounds.values()), {r: len(v) for r, v in rounds.items()}
    seen_order = [a.round_id for a in observer.announcements]
    assert seen_order == sorted(seen_order)  # a restart never goes back to an older round
    models = observer.distinct_models()
    assert sorted(models) == [0, 1, 2]
    assert all(len(v) == 1 for v in models.values()), models

    store = AggregatorStore(fed.store, readonly=True)
    try:
        records = store.rounds()
        assert [r.round_id for r in records] == list(range(1, len(records) + 1))
        assert records[0].phase == "failed" and records[0].outcome == "quorum"
        assert records[0].result == b"" and store.accepted(1) == []
        done = [r for r in records if r.phase == "done"]
        assert len(done) == 2
        for rec in done:
            results, released = round_outcome(rec.result)
            result = results[0]
            rows = store.accepted(rec.round_id)
            assert {dig for _, dig, _ in rows} <= fleet.digests(rec.round_id)
            expected = np.sum([fleet.rounds[rec.round_id].values[d] for d, _, _ in rows], axis=0)
            assert result.count == len(rows) >= 3
            np.testing.assert_array_equal(released, expected)
        # the stored chain is the published one
        stored = {v: dig for v, _, dig in store.models()}
        assert {v: {dig} for v, dig in stored.items()} == models
        for (_, _, parent), (v, _, _) in itertools.pairwise(store.models()):
            assert store.model(v).parent_digest == parent  # type: ignore[union-attr]
    finally:
        store.close()
