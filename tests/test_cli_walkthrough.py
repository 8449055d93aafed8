"""The README's real-use walkthrough, command by command, against Mosquitto.

keys ceremony (2-of-3) -> device enroll (pinning the policy) -> keyholder
approve (two members) -> aggregator init (edited) -> three `edgefl keyholder
serve` processes -> aggregator serve -> two `edgefl device run` processes ->
status: two DP rounds complete, decrypted by the committee.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from firmware_sim.broker import MosquittoBroker
from firmware_sim.committee import CommitteeProcesses

pytestmark = pytest.mark.broker


def edgefl(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "edge_sdk.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # report what it said, not just the timeout
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        return subprocess.CompletedProcess(exc.cmd, -9, "", f"timed out after {timeout}s\n{err}")


def test_walkthrough(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFL_KEY_PASSPHRASE": "correct horse battery", "PYTHONUNBUFFERED": "1"}
    ceremony = edgefl(
        "keys",
        "ceremony",
        "--out",
        "keys",
        "--federation",
        "demo",
        "--holders",
        "3",
        "--threshold",
        "2",
        "--min-clients",
        "2",
        "--epsilon",
        "8",
        "--delta",
        "1e-6",
        "--rounds",
        "2",
        "--bits",
        "2048",  # the default is 3072; 2048 keeps the test quick
        "--broker",
        mosquitto.url,
        "--json",
        cwd=tmp_path,
        env=env,
    )
    assert ceremony.returncode == 0, ceremony.stderr
    summary = json.loads(ceremony.stdout)
    # 2-of-3: the commit quorum is every member, and the ceremony says so
    assert summary["commit_quorum"] == 3 and summary["members_may_be_offline"] == 0
    assert "all 3 members are online" in ceremony.stderr
    assert not list((tmp_path / "keys").rglob("paillier_secret.json"))  # no whole key anywhere
    no_pass = {k: v for k, v in env.items() if k != "EDGEFL_KEY_PASSPHRASE"}
    refused = edgefl(
        "keys", "ceremony", "--out", "keys2", "--federation", "demo", cwd=tmp_path, env=no_pass
    )
    assert refused.returncode == 2  # no passphrase and no explicit insecure mode
    for i in (1, 2):
        r = edgefl(
            "device",
            "enroll",
            "--id",
            f"pi-{i}",
            "--state-dir",
            f"dev{i}",
            "--registry",
            "registry.json",
            "--federation",
            "demo",
            "--policy",
            "keys/policy.json",
            "--json",
            cwd=tmp_path,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["policy_digest"] == summary["policy_digest"]
        rng = np.random.default_rng(i)
        np.savez(
            tmp_path / f"data{i}.npz",
            x=rng.normal(size=(50, 4)).astype(np.float32),
            y=rng.integers(0, 3, 50),
        )
        (tmp_path / f"device{i}.toml").write_text(f"""
[device]
id = "pi-{i}"
federation = "demo"
state_dir = "dev{i}"
[broker]
url = "{mosquitto.url}"
[keys]
public_key = "keys/paillier_public.json"
policy = "keys/policy.json"
[privacy]
budget_epsilon = 10.0
delta = 1e-6
[training]
model = "softmax"
features = 4
classes = 3
data = "data{i}.npz"
""")
    for holder in ("keyholder-1", "keyholder-2"):  # T = 2 members approve each enrollment
        approved = edgefl(
            "keyholder",
            "approve",
            "--config",
            f"keys/{holder}/keyholder.toml",
            "--registry",
            "registry.json",
            "--all",
            cwd=tmp_path,
            env=env,
        )
        assert approved.returncode == 0, approved.stderr
    assert edgefl("aggregator", "init", "aggregator.toml", cwd=tmp_path, env=env).returncode == 0
    ident = edgefl(
        "aggregator", "identity", "--config", "aggregator.toml", "--json", cwd=tmp_path, env=env
    )
    aggregator_key = json.loads(ident.stdout)["aggregator_key"]
    for i in (1, 2):  # devices pin the aggregator's signing key
        config = tmp_path / f"device{i}.toml"
        config.write_text(
            config.read_text().replace(
                'public_key = "keys/paillier_public.json"',
                f'public_key = "keys/paillier_public.json"\naggregator_key = "{aggregator_key}"',
            )
        )
    text = (tmp_path / "aggregator.toml").read_text()
    for old, new in (
        ("dimension = 7850", "dimension = 15"),
        ("min_clients = 10 ", "min_clients = 2 "),
        ("target_clients = 50", "target_clients = 2"),
        ("rounds = 0 ", "rounds = 2 "),
        ('url = "mqtt://127.0.0.1:1883"', f'url = "{mosquitto.url}"'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "aggregator.toml").write_text(text)
    # the members first (each its own `edgefl keyholder serve` process): they
    # must be watching updates/+ before devices publish
    committee = CommitteeProcesses(
        [tmp_path / "keys" / f"keyholder-{h}" / "keyholder.toml" for h in (1, 2, 3)],
        env=env,
    )
    committee.start()
    devices = [
        subprocess.Popen(
            [sys.executable, "-m", "edge_sdk.cli", "device", "run", "--config", f"device{i}.toml"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in (1, 2)
    ]
    try:
        served = edgefl(
            "aggregator",
            "serve",
            "--config",
            "aggregator.toml",
            "--exit-when-done",
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        logs = "".join("".join(m.lines[-10:]) for m in committee.members)
        assert served.returncode == 0, served.stderr[-2000:] + "\n" + logs
        # The last receipts are in flight when the aggregator exits: give the
        # running devices a moment to apply them before stopping them.
        outboxes = [tmp_path / f"dev{i}" / "outbox" for i in (1, 2)]
        deadline = time.monotonic() + 20
        while any(any(o.glob("*.update")) for o in outboxes) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for proc in devices:
            proc.send_signal(signal.SIGTERM)
        for proc in devices:
            proc.wait(20)
        committee.stop()
    for h in (1, 2, 3):  # each member kept request digests only, one per round
        state = json.loads((tmp_path / "keys" / f"keyholder-{h}" / "state.json").read_text())
        assert set(state) <= {"1", "2"}
    status = json.loads(
        edgefl("status", "--store", "aggregator.db", "--json", cwd=tmp_path, env=env).stdout
    )
    assert status["rounds_done"] == 2 and status["model"]["version"] == 2
    for i in (1, 2):
        dev = json.loads(
            edgefl(
                "device", "status", "--config", f"device{i}.toml", "--json", cwd=tmp_path, env=env
            ).stdout
        )
        assert dev["rounds"] == 2 and dev["outbox"] == []
        assert 0 < dev["epsilon_spent"] <= 8.0
