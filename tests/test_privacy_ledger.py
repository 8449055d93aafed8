"""The durable privacy ledger: budget, idempotency, corruption, and real SIGKILLs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_sdk.errors import BudgetExhaustedError, ConfigError, LedgerCorruptedError
from edge_sdk.privacy import (
    DPPolicy,
    PrivacyLedger,
    RoundAlreadySpentError,
    calibrate,
    compose_epsilon,
    cost_of,
    update_digest,
)

REPO = Path(__file__).resolve().parent.parent
BUDGET = 2.0
POLICY = DPPolicy(
    mode="distributed", epsilon=BUDGET, delta=1e-5, rounds=3, clip=1.0, min_clients=10
)
SPEC = calibrate(POLICY, scale=64.0, dimension=50)
COST = cost_of(SPEC)


def _ledger(tmp_path: Path, **kw: object) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.json", BUDGET, 1e-5, **kw)  # type: ignore[arg-type]


def test_new_ledger_is_created_durably_and_empty(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    assert (tmp_path / "ledger.json").exists()
    assert led.spent() == 0.0 and led.remaining() == BUDGET and led.entries == ()


def test_records_accumulate_and_survive_reopen(tmp_path: Path) -> None:
    led = _ledger(tmp_path, clock=lambda: 1234.5)
    e = led.record(
        "f/1", COST, idempotency_key="a", federation="f", round_id=1, noise=SPEC.to_dict()
    )
    assert e.seq == 0 and e.recorded_unix == 1234.5 and e.round_id == 1
    led.record("f/2", COST, idempotency_key="b")
    again = _ledger(tmp_path)
    assert [x.round_key for x in again.entries] == ["f/1", "f/2"]
    assert again.spent() == pytest.approx(compose_epsilon([(COST, 2)], 1e-5), rel=0, abs=0)
    assert again.has_spent("f/2") and not again.has_spent("f/3")
    assert again.entry("f/1") is not None and again.entry("f/1").noise == SPEC.to_dict()  # type: ignore[union-attr]


def test_calibrated_rounds_exactly_fit_the_budget(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    for r in range(POLICY.rounds):
        led.record(f"f/{r}", COST, idempotency_key=str(r))
    assert led.spent() <= BUDGET
    with pytest.raises(BudgetExhaustedError):
        led.check(COST)


def test_refusal_changes_nothing_validate_then_mutate(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    for r in range(POLICY.rounds):
        led.record(f"f/{r}", COST, idempotency_key=str(r))
    before = (tmp_path / "ledger.json").read_bytes()
    with pytest.raises(BudgetExhaustedError, match="budget"):
        led.record("f/99", COST, idempotency_key="z")
    assert (tmp_path / "ledger.json").read_bytes() == before
    assert len(led.entries) == POLICY.rounds and not led.has_spent("f/99")


def test_resending_the_same_update_does_not_spend_twice(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    first = led.record("f/1", COST, idempotency_key=update_digest(b"envelope"))
    spent = led.spent()
    again = _ledger(tmp_path).record("f/1", COST, idempotency_key=update_digest(b"envelope"))
    assert again == first
    assert _ledger(tmp_path).spent() == spent and len(_ledger(tmp_path).entries) == 1


def test_a_new_update_for_a_spent_round_is_refused(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    led.record("f/1", COST, idempotency_key=update_digest(b"first noise"))
    with pytest.raises(RoundAlreadySpentError, match="resend"):
        led.record("f/1", COST, idempotency_key=update_digest(b"fresh noise"))
    assert len(led.entries) == 1


def test_two_handles_see_each_others_records(tmp_path: Path) -> None:
    a, b = _ledger(tmp_path), _ledger(tmp_path)
    a.record("f/1", COST, idempotency_key="x")
    with pytest.raises(RoundAlreadySpentError):
        b.record("f/1", COST, idempotency_key="y")
    b.record("f/2", COST, idempotency_key="z")
    assert len(b.entries) == 2


def test_budget_is_fixed_for_the_ledgers_lifetime(tmp_path: Path) -> None:
    _ledger(tmp_path)
    with pytest.raises(ConfigError, match="fixed"):
        PrivacyLedger(tmp_path / "ledger.json", BUDGET * 2, 1e-5)
    assert PrivacyLedger.open_existing(tmp_path / "ledger.json").budget_epsilon == BUDGET
    with pytest.raises(ConfigError):
        PrivacyLedger.open_existing(tmp_path / "missing.json")


def test_the_ledger_writes_through_the_one_atomic_write_and_cleans_its_leftovers(
    tmp_path: Path,
) -> None:
    steps: list[str] = []
    led = _ledger(tmp_path, step_hook=steps.append)
    led.record("f/1", COST, idempotency_key="x")
    assert steps[-4:] == ["tmp_written", "tmp_synced", "renamed", "dir_synced"]
    stale = tmp_path / ".ledger.json.tmp-123-abc"  # a write killed before its rename
    stale.write_bytes(b"half")
    other = tmp_path / ".outbox.tmp-123-abc"
    other.write_bytes(b"not the ledger's")
    assert len(_ledger(tmp_path).entries) == 1
    assert not stale.exists() and other.exists()


def test_stale_temporary_file_is_ignored(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    led.record("f/1", COST, idempotency_key="x")
    (tmp_path / "ledger.json.tmp").write_bytes(b"half a ledg")
    assert len(_ledger(tmp_path).entries) == 1


def _rewrite_with_valid_checksum(path: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(path.read_text())
    mutate(doc)
    body = {k: v for k, v in doc.items() if k != "sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc["sha256"] = hashlib.sha256(canon).hexdigest()
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-40]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()), id="not-utf8"),
        pytest.param(
            lambda p: p.write_text(
                p.read_text().replace('"epsilon_after": ', '"epsilon_after": 0')
            ),
            id="edited-without-checksum",
        ),
        pytest.param(
            lambda p: _rewrite_with_valid_checksum(p, lambda d: d.update(kind="other")),
            id="wrong-kind",
        ),
        pytest.param(
            lambda p: _rewrite_with_valid_checksum(
                p, lambda d: d["entries"].append(dict(d["entries"][0], seq=1))
            ),
            id="duplicate-round",
        ),
        pytest.param(
            lambda p: _rewrite_with_valid_checksum(
                p, lambda d: d["entries"][0]["cost"].update(central=[[-1.0, 0.0]])
            ),
            id="negative-cost",
        ),
        pytest.param(
            lambda p: _rewrite_with_valid_checksum(p, lambda d: d["entries"][0].pop("seq")),
            id="missing-field",
        ),
        pytest.param(lambda p: p.write_text("[]"), id="not-an-object"),
    ],
)
def test_corrupted_ledger_is_a_hard_error_never_a_reset(tmp_path: Path, corrupt) -> None:  # type: ignore[no-untyped-def]
    led = _ledger(tmp_path)
    led.record("f/1", COST, idempotency_key="x")
    path = tmp_path / "ledger.json"
    corrupt(path)
    broken = path.read_bytes()
    with pytest.raises(LedgerCorruptedError, match="refusing to reset"):
        _ledger(tmp_path)
    with pytest.raises(LedgerCorruptedError):
        led.record("f/2", COST, idempotency_key="y")  # re-reads under the lock
    assert path.read_bytes() == broken  # untouched


def test_deleted_ledger_under_an_open_handle_is_an_error(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    (tmp_path / "ledger.json").unlink()
    with pytest.raises(LedgerCorruptedError, match="disappeared"):
        led.record("f/1", COST, idempotency_key="x")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PrivacyLedger(tmp_path / "l.json", 0.0, 1e-5)
    with pytest.raises(ValueError):
        PrivacyLedger(tmp_path / "l.json", 1.0, 1.0)
    led = _ledger(tmp_path)
    with pytest.raises(ValueError):
        led.record("", COST, idempotency_key="x")


# --------------------------------------------------------------------------- crash tests

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import numpy as np
    from edge_sdk.errors import BudgetExhaustedError
    from edge_sdk.privacy import NoiseSpec, PrivacyLedger, add_noise, cost_of, update_digest

    work = Path(sys.argv[1])
    budget = float(sys.argv[2])
    kill_at = os.environ.get("KILL_AT", "")
    counts = {}

    def step(name):
        counts[name] = counts.get(name, 0) + 1
        if kill_at == f"{name}:{counts[name]}":
            os.kill(os.getpid(), signal.SIGKILL)

    def durable_write(path, data):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data); f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY); os.fsync(fd); os.close(fd)

    spec = NoiseSpec.from_dict(json.loads((work / "spec.json").read_text()))
    cost = cost_of(spec)
    ledger = PrivacyLedger(work / "ledger.json", budget, spec.delta, step_hook=step)
    outbox = work / "outbox"
    outbox.mkdir(exist_ok=True)
    for r in range(6):
        key = f"fed/{r}"
        box = outbox / f"{r}.bin"
        if (outbox / f"{r}.done").exists():
            continue
        if box.exists():
            payload = box.read_bytes()          # resend the stored update unchanged
        elif ledger.has_spent(key):
            continue                            # spent but nothing stored: never re-noise
        else:
            try:
                ledger.check(cost)
            except BudgetExhaustedError:
                break
            payload = add_noise(np.zeros(spec.dimension, np.int64), spec).tobytes()
            step("noised")
            durable_write(box, payload)
            step("outbox_written")
        try:
            ledger.record(key, cost, idempotency_key=update_digest(payload),
                          federation="fed", round_id=r, noise=spec.to_dict())
        except BudgetExhaustedError:
            box.unlink()
            break
        step("recorded")
        with open(work / "sent.log", "a") as f:   # the network
            f.write(f"{r} {update_digest(payload)}\\n"); f.flush(); os.fsync(f.fileno())
        step("sent")
        box.rename(outbox / f"{r}.done")           # acked by the aggregator
        step("acked")
    """
)

# ledger writes: #1 creates the file, #2.. are records
LEDGER_STEPS = ["tmp_written", "tmp_synced", "renamed", "dir_synced"]
AGENT_STEPS = ["noised", "outbox_written", "recorded", "sent", "acked"]
KILL_POINTS = [f"{s}:{n}" for s in LEDGER_STEPS for n in (1, 2, 3)] + [
    f"{s}:{n}" for s in AGENT_STEPS for n in (1, 2)
]


def _run(work: Path, kill_at: str | None) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = kill_at
    proc = subprocess.run(
        [sys.executable, str(work / "child.py"), str(work), repr(BUDGET)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()
    return proc.returncode


def _check_invariants(work: Path) -> None:
    if not (work / "ledger.json").exists():  # killed while creating it
        assert not (work / "sent.log").exists()
        return
    led = PrivacyLedger.open_existing(work / "ledger.json")
    sent: dict[int, set[str]] = {}
    log = work / "sent.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        r, digest = line.split()
        sent.setdefault(int(r), set()).add(digest)
    # no update was ever sent twice with fresh noise
    assert all(len(d) == 1 for d in sent.values()), sent
    # every update that left the device was durably charged, with its digest
    for r, digests in sent.items():
        entry = led.entry(f"fed/{r}")
        assert entry is not None and {entry.idempotency_key} == digests
    # the budget is never under-counted and never exceeded
    assert led.spent() >= compose_epsilon([(COST, len(sent))], led.delta)
    assert led.spent() <= BUDGET
    assert len(led.entries) <= POLICY.rounds


def _setup(tmp_path: Path) -> Path:
    work = tmp_path / "dev"
    work.mkdir()
    (work / "child.py").write_text(CHILD)
    (work / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    return work


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_between_every_step_of_spend_and_send(tmp_path: Path, kill_at: str) -> None:
    work = _setup(tmp_path)
    assert _run(work, kill_at) == -signal.SIGKILL
    _check_invariants(work)  # also holds right after the crash
    assert _run(work, None) == 0
    _check_invariants(work)
    # the restarted device used its whole budget: the calibrated number of rounds was sent
    sent_rounds = {line.split()[0] for line in (work / "sent.log").read_text().splitlines()}
    assert len(sent_rounds) == POLICY.rounds


@pytest.mark.parametrize(
    ("first", "second"),
    [("recorded:1", "sent:1"), ("renamed:2", "tmp_synced:2"), ("outbox_written:2", "renamed:1")],
)
def test_sigkill_again_during_recovery(tmp_path: Path, first: str, second: str) -> None:
    work = _setup(tmp_path)
    assert _run(work, first) == -signal.SIGKILL
    _run(work, second)
    _check_invariants(work)
    assert _run(work, None) == 0
    _check_invariants(work)
