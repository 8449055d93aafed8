"""Contract suite for every registered server optimizer (``aggregator.optimizers.OPTIMIZERS``).

Each test is parametrized over the registry, so a newly registered optimizer
is covered without touching this file. The contracts:

* state round-trips bit-identically through the real store after a SIGKILL,
  and through a restart of the real round machine;
* foreign state (another optimizer's, corrupt, another model's dimension,
  non-finite or negative moments) is refused with ``OptimizerStateError``
  and changes nothing;
* a zero update: from a fresh state it leaves the model bit-identical and
  leaves no trace (the next step equals a fresh optimizer's); with its
  momentum setting at 0 it is a no-op on the model after any history; with
  momentum it adds no direction: the model coasts along the momentum it
  had, by a smaller step than the last one;
* noise is added before the server step: through the real round machine with
  a DP plan and the in-memory committee, the optimizer's input is exactly the
  released (noised) aggregate's mean, the published model is exactly the
  optimizer's output, a server learning rate scales signal and noise alike,
  and the announcement (so the noise and the epsilon each device charges)
  does not depend on the server optimizer or its settings;
* stale state is not carried: a machine's first start resets an optimizer
  that has history, and a store written by another optimizer or for another
  model is refused on restore.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import pytest

from aggregator.keyholder import KeyHolder, exchange
from aggregator.optimizers import (
    OPTIMIZERS,
    OptimizerStateError,
    ServerOptimizer,
    make_optimizer,
    mean_delta,
    optimizer_settings,
)
from aggregator.planning import RoundPlan, plan_rounds
from aggregator.rounds import (
    Action,
    Commit,
    KeyholderAnswered,
    MessageReceived,
    RequestDecryption,
    RoundConfig,
    RoundMachine,
    RoundRecord,
    Start,
    round_outcome,
)
from aggregator.store import AggregatorStore
from edge_sdk.errors import ConfigError
from edge_sdk.pipeline import RoundContext
from edge_sdk.privacy import DPPolicy, cost_of
from edge_sdk.protocol import GlobalModel, model_digest
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import FED, Fleet, make_update, update_messages

keypair = _support.keypair  # session fixture

NAMES = sorted(OPTIMIZERS)
DIM = 24
ROOT = Path(__file__).resolve().parent.parent
F64 = npt.NDArray[np.float64]


def _delta(i: int, dim: int = DIM) -> F64:
    """The i-th deterministic pseudo-gradient (mixed signs, some exact zeros)."""
    d = np.random.default_rng(1000 + i).normal(0.0, 0.05, dim)
    d[::7] = 0.0
    return d


def _advance(opt: ServerOptimizer, weights: npt.NDArray[np.float32], delta: F64) -> Any:
    """One model step as the round machine takes it (float32 model, float64 step)."""
    return opt.step(weights.astype(np.float64), delta).astype("<f4")


def _history(name: str, steps: int, **settings: float) -> tuple[ServerOptimizer, Any]:
    opt = make_optimizer({"name": name, **settings})
    w = np.full(DIM, 0.25, dtype="<f4")
    for i in range(steps):
        w = _advance(opt, w, _delta(i))
    return opt, w


def test_registry_is_what_the_config_selects() -> None:
    assert {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"} <= set(OPTIMIZERS)
    for name in NAMES:
        opt = make_optimizer({"name": name})
        assert type(opt) is OPTIMIZERS[name] and opt.name == name
        assert set(optimizer_settings(name)) >= {"lr"}


@pytest.mark.parametrize("name", NAMES)
def test_settings_are_checked_by_name_type_and_range(name: str) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": "0.1"}, "lr must be a number"),
        ({"lr": True}, "lr must be a number"),
        ({"learning_rate": 0.1}, "has no setting 'learning_rate'"),
    ]
    settings = optimizer_settings(name)
    for key in ("momentum", "beta1", "beta2"):
        if key in settings:
            bad += [({key: 1.0}, f"{key} must be in \\[0, 1\\)"), ({key: -0.1}, key)]
    if "tau" in settings:
        bad += [({"tau": 0.0}, "tau must be > 0"), ({"tau": float("inf")}, "tau must be finite")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            make_optimizer({"name": name, **change})
    # every setting reaches the optimizer (a value other than its default)
    for key, default in settings.items():
        value = default / 2 if default else 0.5
        assert getattr(make_optimizer({"name": name, key: value}), key) == value


# ---------------------------------------------------------------- crash safety


def _model(version: int, parent: bytes, weights: npt.NDArray[np.float32]) -> GlobalModel:
    raw = weights.astype("<f4").tobytes()
    return GlobalModel(
        federation=FED,
        version=version,
        round_id=version,
        parent_digest=parent,
        digest=model_digest(version, parent, raw),
        num_params=weights.size,
        weights=raw,
        created_ms=version,
    )


def crash_child(path: str, name: str, steps: int) -> None:
    """Subprocess body: ``steps`` committed models with their states, then SIGKILL."""
    store = AggregatorStore(path, federation=FED, key_fingerprint="ab" * 32)
    opt = make_optimizer({"name": name})
    w = np.full(DIM, 0.25, dtype="<f4")
    parent = bytes(32)
    for version in range(1, steps + 1):
        w = _advance(opt, w, _delta(version - 1))
        model = _model(version, parent, w)
        record = RoundRecord(round_id=version, phase="done", announcement=b"", opened_ms=version)
        store.commit(Commit(records=(record,), model=model, optimizer_state=opt.state_bytes()))
        parent = model.digest
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: a crash


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_sigkill_of_the_store_bit_identically(name: str, tmp_path: Path) -> None:
    steps = 4
    path = tmp_path / "agg.db"
    code = (
        "from tests.test_optimizers_contract import crash_child; "
        f"crash_child({str(path)!r}, {name!r}, {steps})"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # uninterrupted reference run, in this process
    ref, w_ref = _history(name, steps)
    store = AggregatorStore(path, federation=FED, key_fingerprint="ab" * 32)
    latest = store.latest_model()
    assert latest is not None
    model, state = latest
    assert model.version == steps and model.weights == w_ref.tobytes()
    assert state == ref.state_bytes()
    resumed = make_optimizer({"name": name})
    resumed.load_state(state, dimension=DIM)
    w_stored = np.frombuffer(model.weights, dtype="<f4")
    for i in range(steps, steps + 3):  # the next steps agree to the bit
        w_stored = _advance(resumed, w_stored, _delta(i))
        w_ref = _advance(ref, w_ref, _delta(i))
        assert w_stored.tobytes() == w_ref.tobytes()
        assert resumed.state_bytes() == ref.state_bytes()
    store.close()


# ---------------------------------------------------------------- foreign state


@pytest.mark.parametrize("name", NAMES)
def test_every_other_optimizers_state_is_refused(name: str) -> None:
    opt, _ = _history(name, 2)
    before = opt.state_bytes()
    for other in NAMES:
        if other == name:
            continue
        foreign, _ = _history(other, 2)
        with pytest.raises(OptimizerStateError, match=f"{other!r} state, not a {name} state"):
            opt.load_state(foreign.state_bytes(), dimension=DIM)
        assert opt.state_bytes() == before


def _corrupt_records(name: str, state: bytes) -> dict[str, bytes]:
    doc = msgpack.unpackb(state, raw=False)
    arrays = [k for k in doc if k != "optimizer" and doc[k] is not None]
    out = {
        "truncated": state[: len(state) // 2],
        "garbage": bytes(range(7, 60)),
        "not_a_map": msgpack.packb([name, 1, 2]),
        "no_name": msgpack.packb({"m": b""}),
        "extra_field": msgpack.packb({**doc, "lr": 0.5}, use_bin_type=True),
    }
    for key in arrays:
        raw = doc[key]
        out[f"{key}_odd_length"] = msgpack.packb({**doc, key: raw[:-3]}, use_bin_type=True)
        nan = np.frombuffer(raw, "<f8").copy()
        nan[3] = np.nan
        out[f"{key}_nan"] = msgpack.packb({**doc, key: nan.tobytes()}, use_bin_type=True)
        out[f"{key}_not_bytes"] = msgpack.packb({**doc, key: 5}, use_bin_type=True)
    if "v" in arrays:
        neg = np.frombuffer(doc["v"], "<f8").copy()
        neg[1] = -1e-3
        out["v_negative"] = msgpack.packb({**doc, "v": neg.tobytes()}, use_bin_type=True)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_state_is_refused_and_changes_nothing(name: str) -> None:
    opt, _ = _history(name, 3)
    before = opt.state_bytes()
    for label, blob in _corrupt_records(name, before).items():
        with pytest.raises(OptimizerStateError):
            opt.load_state(blob, dimension=DIM)
        assert opt.state_bytes() == before, label


@pytest.mark.parametrize("name", NAMES)
def test_state_of_another_dimension_is_refused(name: str) -> None:
    if not OPTIMIZERS[name].state_keys:
        pytest.skip(f"{name} keeps no arrays: its state fits every dimension")
    small = make_optimizer({"name": name})
    small.step(np.zeros(DIM - 5), _delta(0, DIM - 5))
    opt = make_optimizer({"name": name})
    with pytest.raises(OptimizerStateError, match="another model"):
        opt.load_state(small.state_bytes(), dimension=DIM)
    # and without a declared dimension, the step refuses the mismatch
    opt.load_state(small.state_bytes())
    with pytest.raises(OptimizerStateError, match="another model"):
        opt.step(np.zeros(DIM), _delta(1))


# ---------------------------------------------------------------- zero update


@pytest.mark.parametrize("name", NAMES)
def test_zero_update_from_fresh_state_is_a_no_op_and_leaves_no_trace(name: str) -> None:
    w0 = np.linspace(-1.0, 1.0, DIM).astype("<f4") + np.float32(0.5)
    opt = make_optimizer({"name": name})
    w1 = _advance(opt, w0, np.zeros(DIM))
    assert w1.tobytes() == w0.tobytes()
    fresh = make_optimizer({"name": name})
    assert _advance(opt, w1, _delta(0)).tobytes() == _advance(fresh, w0, _delta(0)).tobytes()
    assert opt.state_bytes() == fresh.state_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_zero_update_without_momentum_is_a_no_op_after_any_history(name: str) -> None:
    setting = OPTIMIZERS[name].momentum_setting
    opt, w = _history(name, 5, **({} if setting is None else {setting: 0.0}))
    assert _advance(opt, w, np.zeros(DIM)).tobytes() == w.tobytes()


@pytest.mark.parametrize("name", [n for n in NAMES if OPTIMIZERS[n].momentum_setting])
def test_zero_update_with_momentum_only_coasts(name: str) -> None:
    """ "No-op" with momentum: no new direction, and the coasting step decays."""
    setting = OPTIMIZERS[name].momentum_setting
    assert setting is not None
    opt = make_optimizer({"name": name, setting: 0.9})
    w = np.zeros(DIM)
    for i in range(4):
        w_prev, w = w, opt.step(w, _delta(i))
    last = w - w_prev
    coast = opt.step(w, np.zeros(DIM)) - w
    moving = last != 0
    assert np.all(coast[~moving] == 0)
    assert np.all(np.sign(coast[moving]) == np.sign(last[moving]))
    assert np.all(np.abs(coast[moving]) < np.abs(last[moving]))


# ---------------------------------------------------------------- the round machine


@dataclass
class _Recording:
    """A registered optimizer that records what the round machine hands it."""

    inner: ServerOptimizer
    calls: list[tuple[F64, F64, F64]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def step(self, weights: F64, delta: F64) -> F64:
        out = self.inner.step(weights, delta)
        self.calls.append((weights.copy(), delta.copy(), out.copy()))
        return out

    def state_bytes(self) -> bytes:
        return self.inner.state_bytes()

    def load_state(self, blob: bytes, *, dimension: int | None = None) -> None:
        self.inner.load_state(blob, dimension=dimension)


class _Run:
    """The real round machine + store + the in-memory committee's members."""

    def __init__(
        self,
        pk: Any,
        fleet: Fleet,
        store_path: Path,
        optimizer: ServerOptimizer,
        *,
        dp: bool,
        members: list[KeyHolder] | None = None,
    ) -> None:
        committee = _support._default_committee()
        policy = (
            DPPolicy(mode="distributed", epsilon=2.0, delta=1e-5, rounds=3, clip=1.0, min_clients=4)
            if dp
            else None
        )
        self.plan: RoundPlan = plan_rounds(
            pk, dimension=DIM, max_contributors=16, min_clients=4, clip=1.0, policy=policy
        )
        cfg = RoundConfig(federation=FED, min_clients=4, target_clients=4, round_duration_ms=60_000)
        self.machine = RoundMachine(
            cfg,
            self.plan,
            fleet.registry,
            optimizer,
            initial_weights=np.full(DIM, 0.25, dtype=np.float32),
            committee=committee.verifier(),
        )
        self.store = AggregatorStore(store_path, federation=FED, key_fingerprint=pk.fingerprint)
        self.members = members or committee.members(fleet.registry, min_clients=4)
        self.pk, self.fleet = pk, fleet
        self.commits: list[Commit] = []

    def feed(self, event: Any) -> list[Action]:
        actions = self.machine.handle(event)
        for action in actions:
            self.store.apply(action)
            if isinstance(action, Commit):
                self.commits.append(action)
            if isinstance(action, RequestDecryption):
                for result in exchange(self.members, action.request):
                    self.feed(KeyholderAnswered(result=result, now_ms=event.now_ms))
        return actions

    def round(self, r: int) -> None:
        """Four devices send fixed deltas with fixed (test-seam) randomness."""
        ann = self.machine.announcement
        assert ann is not None and ann.round_id == r
        for i, dev in enumerate(self.fleet.ids()[:4]):
            upd, _ = make_update(ann, self.pk, self.fleet.identities[dev], self.delta(r, i), seed=r)
            for topic, payload in update_messages(upd):
                for member in self.members:
                    member.witness(topic, payload)
                self.feed(MessageReceived(topic=topic, payload=payload, now_ms=10_000 * r))
        assert self.machine.round_id == r + 1, "the round did not complete"

    @staticmethod
    def delta(r: int, i: int) -> F64:
        return np.random.default_rng(100 * r + i).normal(0.0, 0.02, DIM)

    def weights(self) -> npt.NDArray[np.float32]:
        model = self.machine.model
        assert model is not None
        return np.frombuffer(model.weights, dtype="<f4")

    def released(self, r: int) -> npt.NDArray[np.int64]:
        record = self.store.round_record(r)
        assert record is not None and record.phase == "done"
        released = round_outcome(record.result)[1]
        assert released is not None
        return released


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(5, tmp_path / "registry.json")


@pytest.mark.parametrize("name", NAMES)
def test_machine_restart_resumes_the_optimizer_bit_identically(
    name: str, keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    straight = _Run(pk, fleet, tmp_path / "a.db", make_optimizer({"name": name}), dp=False)
    straight.feed(Start(now_ms=1_000))
    for r in (1, 2, 3):
        straight.round(r)
    first = _Run(pk, fleet, tmp_path / "b.db", make_optimizer({"name": name}), dp=False)
    first.feed(Start(now_ms=1_000))
    first.round(1)
    first.store.close()
    # a new process: new machine, new optimizer object, same store and members
    again = _Run(
        pk,
        fleet,
        tmp_path / "b.db",
        make_optimizer({"name": name}),
        dp=False,
        members=first.members,
    )
    snapshot = again.store.load_snapshot()
    assert snapshot is not None
    again.machine.restore(snapshot)
    again.feed(Start(now_ms=15_000))
    for r in (2, 3):
        again.round(r)
    assert again.weights().tobytes() == straight.weights().tobytes()
    assert again.machine.optimizer.state_bytes() == straight.machine.optimizer.state_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_first_start_resets_an_optimizer_with_history(
    name: str, keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    stale, _ = _history(name, 3)
    run = _Run(pk, fleet, tmp_path / "a.db", stale, dp=False)
    commits = [a for a in run.feed(Start(now_ms=1_000)) if isinstance(a, Commit)]
    assert commits[0].optimizer_state == make_optimizer({"name": name}).state_bytes()
    run.round(1)
    clean = _Run(pk, fleet, tmp_path / "b.db", make_optimizer({"name": name}), dp=False)
    clean.feed(Start(now_ms=1_000))
    clean.round(1)
    assert run.weights().tobytes() == clean.weights().tobytes()


def test_restore_refuses_a_store_of_another_optimizer_or_model(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    run = _Run(pk, fleet, tmp_path / "a.db", make_optimizer({"name": "fedadam"}), dp=False)
    run.feed(Start(now_ms=1_000))
    run.round(1)
    snapshot = run.store.load_snapshot()
    assert snapshot is not None
    other = _Run(pk, fleet, tmp_path / "b.db", make_optimizer({"name": "fedyogi"}), dp=False)
    with pytest.raises(OptimizerStateError, match="'fedadam' state, not a fedyogi state"):
        other.machine.restore(snapshot)
    assert other.machine.round_id == 0  # nothing was loaded
    bigger = make_optimizer({"name": "fedadam"})
    bigger.step(np.zeros(DIM + 1), np.ones(DIM + 1))
    foreign = _replace_state(snapshot, bigger.state_bytes())
    fresh = _Run(pk, fleet, tmp_path / "c.db", make_optimizer({"name": "fedadam"}), dp=False)
    with pytest.raises(OptimizerStateError, match="another model"):
        fresh.machine.restore(foreign)


def _replace_state(snapshot: Any, state: bytes) -> Any:
    from dataclasses import replace

    return replace(snapshot, optimizer_state=state)


# ---------------------------------------------------------------- noise before the step


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_sees_only_the_released_noised_mean_and_nothing_is_added_after(
    name: str, keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    recorder = _Recording(make_optimizer({"name": name}))
    run = _Run(pk, fleet, tmp_path / "a.db", recorder, dp=True)
    assert run.plan.noise is not None
    run.feed(Start(now_ms=1_000))
    scale = run.plan.packing.scale
    for r in (1, 2):
        before = run.weights().copy()
        run.round(r)
        weights_in, delta_in, out = recorder.calls[-1]
        released = run.released(r)
        # the input is the decrypted, already-noised aggregate's mean, to the bit ...
        assert delta_in.tobytes() == mean_delta(released, scale=scale, count=4).tobytes()
        # ... stepped from the published model (no copy kept by the optimizer) ...
        assert weights_in.tobytes() == before.astype(np.float64).tobytes()
        # ... and the published model is the step's output: nothing is added after it
        assert run.weights().tobytes() == out.astype("<f4").tobytes()
        # the aggregate carries the devices' noise: released minus the clean sum
        clean = sum(run.delta(r, i) for i in range(4)) * scale
        noise = released - clean
        expected = 2.0 * run.plan.noise.sigma  # sqrt(4 devices) x sigma each
        assert 0.6 * expected < float(np.std(noise)) < 1.5 * expected


def test_server_learning_rate_scales_signal_and_noise_alike(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    """Would fail if noise were added after the server step (Flower's central DP wrapper).

    Then the model would move by ``lr * clean + noise`` and a larger server
    learning rate would shrink the noise relative to the signal. Here the
    released sums (noise included) are identical for every lr, and the model
    moves by exactly ``lr`` times the released mean.
    """
    pk, _ = keypair
    runs = {}
    for lr in (1.0, 4.0):
        run = _Run(
            pk, fleet, tmp_path / f"{lr}.db", make_optimizer({"name": "fedavg", "lr": lr}), dp=True
        )
        run.feed(Start(now_ms=1_000))
        run.round(1)
        run.round(2)
        runs[lr] = run
    one, four = runs[1.0], runs[4.0]
    for r in (1, 2):
        np.testing.assert_array_equal(one.released(r), four.released(r))
    assert one.plan.noise is not None
    scale = one.plan.packing.scale
    total = (one.released(1) + one.released(2)) / (scale * 4)
    w0 = np.float64(0.25)
    moved_1 = one.weights().astype(np.float64) - w0
    moved_4 = four.weights().astype(np.float64) - w0
    np.testing.assert_allclose(moved_1, total, rtol=0, atol=1e-6)
    np.testing.assert_allclose(moved_4, 4.0 * total, rtol=0, atol=4e-6)
    # the noise in the model is not negligible against the tolerance: a wrapper
    # adding it after the step would miss 4 * total by 3 x the noise, far above 4e-6
    noise = total - sum(one.delta(r, i) for r in (1, 2) for i in range(4)) / 4
    assert float(np.std(noise)) > 250 * 4e-6


def test_noise_and_epsilon_do_not_depend_on_the_server_optimizer(
    keypair: Any, fleet: Fleet, tmp_path: Path
) -> None:
    pk, _ = keypair
    announcements = set()
    costs = set()
    for name in NAMES:
        for lr in (0.05, 1.0, 8.0):
            opt = make_optimizer({"name": name, "lr": lr})
            run = _Run(pk, fleet, tmp_path / f"{name}-{lr}.db", opt, dp=True)
            run.feed(Start(now_ms=1_000))
            ann = run.machine.announcement
            assert ann is not None
            announcements.add(ann.to_bytes())
            ctx = RoundContext.from_announcement(ann, pk)
            assert ctx.noise is not None
            costs.add(repr(cost_of(ctx.noise)))
    assert len(announcements) == 1 and len(costs) == 1
