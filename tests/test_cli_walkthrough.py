"""The README's real-use walkthrough, command by command, against Mosquitto.

keys generate -> device enroll -> aggregator init (edited) -> aggregator serve
-> two `edgefl device run` processes -> status: two DP rounds complete.
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

pytestmark = pytest.mark.broker


def edgefl(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_sdk.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_walkthrough(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFL_KEY_PASSPHRASE": "correct horse battery", "PYTHONUNBUFFERED": "1"}
    assert edgefl("keys", "generate", "--out", "keys", cwd=tmp_path, env=env).returncode == 0
    no_pass = {k: v for k, v in env.items() if k != "EDGEFL_KEY_PASSPHRASE"}
    refused = edgefl("keys", "generate", "--out", "keys2", cwd=tmp_path, env=no_pass)
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
            cwd=tmp_path,
            env=env,
        )
        assert r.returncode == 0, r.stderr
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
[privacy]
budget_epsilon = 10.0
delta = 1e-6
[training]
model = "softmax"
features = 4
classes = 3
data = "data{i}.npz"
""")
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
        ("min_clients = 10\nstate", "min_clients = 2\nstate"),
        ('url = "mqtt://127.0.0.1:1883"', f'url = "{mosquitto.url}"'),
        (
            '# [aggregator.privacy]\n# mode = "distributed"\n# epsilon = 8.0\n# delta = 1e-6\n'
            "# rounds = 100\n# min_clients = 10",
            '[aggregator.privacy]\nmode = "distributed"\nepsilon = 8.0\ndelta = 1e-6\n'
            "rounds = 2\nclip = 1.0\nmin_clients = 2",
        ),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "aggregator.toml").write_text(text)
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
            timeout=180,
        )
        assert served.returncode == 0, served.stderr[-2000:]
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
