"""What the wheel ships: every package folder, the benchmarks, and a clean install that works.

The slow test builds the wheel, installs it into a fresh venv WITHOUT any
extra (what a device gets), and runs from there, with the source tree out of
the path: ``edgefl --help``, ``edgefl bench crypto --quick`` and the
device-side tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

#: Device-side test modules: they need nothing beyond the runtime
#: dependencies (pytest and hypothesis are the test tools). Tests needing an
#: extra (scipy, dp-accounting, a broker, PyTorch) must skip cleanly.
DEVICE_TESTS = (
    "test_crypto_paillier.py",
    "test_crypto_packing.py",
    "test_crypto_djn.py",
    "test_crypto_binding.py",
    "test_crypto_multiexp.py",
    "test_crypto_keyfile.py",
    "test_crypto_vectors.py",
    "test_crypto_pool.py",
    "test_protocol_codec.py",
    "test_protocol_chunking.py",
    "test_privacy_clip_noise.py",
    "test_privacy_ledger.py",
    "test_privacy_mechanisms.py",
    "test_privacy_sampler.py",
    "test_privacy_calibration.py",
    "test_models_linear.py",
    "test_models_roles.py",
    "test_agent_session.py",
    "test_agent_trainer_api.py",
    "test_transport_memory.py",
    "test_transport_config.py",
)


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def test_the_package_list_names_every_package_folder() -> None:
    setuptools_cfg = _project()["tool"]["setuptools"]  # type: ignore[index]
    listed = set(setuptools_cfg["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("edge_sdk", "aggregator", "firmware_sim")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk - listed == set(), "package folders missing from pyproject's packages"
    assert listed - on_disk - {"edgefl_benchmarks"} == set(), "listed packages with no folder"
    assert setuptools_cfg["package-dir"] == {"edgefl_benchmarks": "benchmarks"}
    assert (ROOT / "benchmarks" / "__init__.py").is_file()


def test_benchmarks_are_importable_as_the_installed_package() -> None:
    from edge_sdk.bench_cli import list_benchmarks, load_benchmark

    names = list_benchmarks()
    on_disk = sorted(p.stem for p in (ROOT / "benchmarks").glob("[!_]*.py"))
    assert names == on_disk
    assert callable(load_benchmark("crypto").run)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; available: aggregator"):
        load_benchmark("nope")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_a_wheel_in_a_clean_venv_runs_the_cli_the_crypto_bench_and_the_device_tests(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("edgefl-*.whl")
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    py = str(target / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", str(wheel), "pytest", "hypothesis"], tmp_path, env)
    # No extra came along (what a device installs).
    listed = _run([py, "-m", "pip", "list", "--format=json"], tmp_path, env)
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert not installed & {"amqtt", "scikit-learn", "matplotlib", "scipy", "torch"}

    work = tmp_path / "work"  # no source tree here: imports come from the wheel
    work.mkdir()
    edgefl = str(target / "bin" / "edgefl")
    assert "usage: edgefl" in _run([edgefl, "--help"], work, env)
    _run([edgefl, "bench", "crypto", "--quick", "--json", "crypto.json"], work, env)
    figures = json.loads((work / "crypto.json").read_text())
    assert figures["meta"]["benchmark"] == "crypto" and figures["meta"]["quick"] is True

    for folder in ("tests", "examples"):  # the user's own files, beside an installed edgefl
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    where = _run([py, "-c", "import edge_sdk; print(edge_sdk.__file__)"], work, env)
    assert str(target) in where, where
    out = _run(
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            *[f"tests/{name}" for name in DEVICE_TESTS],
        ],
        work,
        env,
    )
    summary = out.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, out
