"""The edgefl command line: help, version, exit codes, entry points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk import __version__
from edge_sdk.cli import main
from firmware_sim.broker import mqtt_ping

BIN = Path(sys.executable).parent


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edgefl {__version__}"


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "broker"):
        assert command in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_group_without_subcommand_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker"]) == 2
    assert "run" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "bench", "broker", "broker run"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command.split(), "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_and_module_entry_points() -> None:
    script = BIN / "edgefl"
    assert script.exists(), "pip install -e . must install the edgefl script"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and __version__ in result.stdout
    for module, group in (("firmware_sim", "broker"), ("aggregator", None)):
        result = run("-m", module, "--help")
        assert result.returncode == 0, result.stderr
        assert f"python -m {module}" in result.stdout
        if group:
            assert group in result.stdout


def test_every_command_group_is_installed() -> None:
    from edge_sdk.cli import available_commands

    assert set(available_commands()) == {
        "aggregator",
        "bench",
        "broker",
        "demo",
        "device",
        "keyholder",
        "keys",
        "model",
        "pki",
        "privacy",
        "sim",
        "status",
    }


def test_help_imports_no_command_module_nor_heavy_library() -> None:
    code = (
        "import sys\n"
        "from edge_sdk.cli import main\n"
        "assert main(['--help']) == 0\n"
        "heavy = ('numpy', 'onnx', 'onnxruntime', 'paho', 'gmpy2', 'phe', 'cryptography')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "    or (m.split('.')[0] in ('aggregator', 'firmware_sim')\n"
        "        and not m.endswith('._commands') and '.' in m))\n"
        "print(loaded)\n"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_ceremony_is_reached_under_keys_from_the_server_package() -> None:
    result = run("-m", "edge_sdk.cli", "keys", "ceremony", "--help")
    assert result.returncode == 0 and "--threshold" in result.stdout


def test_the_device_package_imports_no_server_or_simulator_module() -> None:
    import ast

    root = Path(__file__).resolve().parent.parent / "edge_sdk"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("aggregator", "firmware_sim", "benchmarks"):
                    offenders.append(f"{path.relative_to(root)}: {name}")
    assert offenders == []


def test_one_id_rule_compiled_once() -> None:
    """Every id check uses edge_sdk.ids.ID_PATTERN; no module compiles its own copy."""
    import ast

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for top in ("edge_sdk", "aggregator", "firmware_sim"):
        for path in (root / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and node.value.startswith("[A-Za-z0-9_-]")
                    and path.name != "ids.py"
                ):
                    offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_bench_unknown_name_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.broker
def test_broker_run_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_sdk.cli", "broker", "run", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        host_port = info["url"].removeprefix("mqtt://").split(":")
        assert mqtt_ping(host_port[0], int(host_port[1]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not mqtt_ping(host_port[0], int(host_port[1]), timeout=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sdk_top_level_exports_are_lazy_and_real() -> None:
    code = (
        "import sys, edge_sdk; assert 'edge_sdk.pipeline' not in sys.modules; "
        "from edge_sdk.pipeline import build_update; assert edge_sdk.build_update is build_update"
    )
    assert run("-c", code).returncode == 0
    import edge_sdk

    with pytest.raises(AttributeError, match="no attribute"):
        _ = edge_sdk.no_such_name  # type: ignore[attr-defined]
