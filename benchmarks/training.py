"""Local training speed and memory: edgefl's ONNX training step vs PyTorch CPU.

Run: ``edgefl bench training --json FILE [--quick]``.

Figures:
- ``onnx_step_ms``: one SGD step (forward, backward, update) of the digits MLP
  (64-64-10, 4,810 weights) at batch 32, via ``OnnxModel.fit`` on one
  onnxruntime thread.
- ``torch_step_ms``: the same network, batches and optimizer in PyTorch
  (``zero_grad``, forward, cross-entropy, ``backward``, ``step``), the faster of
  one thread and PyTorch's default thread count; null when torch is absent.
- ``onnx_vs_torch_speedup``: ``torch_step_ms / onnx_step_ms`` (target >= 1).
- ``peak_rss_mb``: peak resident memory of a child process that runs one
  round for a 784-64-10 MLP (50,890 weights): load, one epoch of local
  training on 2,000 examples, evaluate, export (target <= 120 MB). The child
  reads its own ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` is not
  used: Linux carries it across fork+exec, so it would report this parent's
  peak, which includes PyTorch). ``baseline_rss_mb`` is a child that only
  imports numpy and onnxruntime.
- the same pair for the digits CNN (informative, no target).
- ``families``: per model family of ``examples/zoo`` (exported with
  ``export_torch``): ``speedup_vs_torch`` (PyTorch step / edgefl step, same
  model, batch 16, best of 1 and default torch threads; target >= 1.0),
  ``peak_rss_mb`` (a child process without PyTorch that loads the exported
  file, trains one epoch, evaluates and exports; target <= 120 MB) and
  ``parity_max_abs`` (largest difference of weights, running statistics and
  predictions after 20 SGD steps vs PyTorch; target <= 1e-4). ``misses``
  lists every target a family missed, with the reason. Null without torch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.models import OnnxModel, TrainConfig, zoo

# VmHWM (this process's own peak RSS) rather than ru_maxrss: on Linux the
# latter survives fork+exec, so a child of a big parent reports the parent's peak.
_PEAK = """
def peak_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

_ROUND_CHILD = (
    _PEAK
    + """
import json, sys
import numpy as np
from edge_sdk.models import OnnxModel, TrainConfig, zoo
n = int(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, size=(n, 784)).astype(np.float32)
y = rng.integers(0, 10, size=n)
model = OnnxModel(zoo.mlp(784, 64, 10, seed=0))
model.fit(x, y, config=TrainConfig(epochs=1, batch_size=32, lr=0.05), seed=0)
metrics = model.evaluate(x, y)
blob = model.export_onnx()
print(json.dumps({"maxrss_kb": peak_kb(),
                  "parameters": model.layout.size, "export_bytes": len(blob),
                  "loss": metrics["loss"]}))
"""
)

_BASELINE_CHILD = (
    _PEAK
    + """
import json
import numpy, onnxruntime
print(json.dumps({"maxrss_kb": peak_kb()}))
"""
)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        x, y, _, _ = zoo.load_digits()
    except ImportError:  # scikit-learn missing: same shapes, synthetic values
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, size=(1347, 64)).astype(np.float32)
        y = rng.integers(0, 10, size=1347)
    return x, y


def _onnx_step_ms(model_proto: Any, x: np.ndarray, y: np.ndarray, steps: int, reps: int) -> float:
    model = OnnxModel(model_proto, threads=1)
    cfg = TrainConfig(epochs=10_000, batch_size=32, lr=0.01, max_steps=steps)
    model.fit(x, y, config=TrainConfig(batch_size=32, lr=0.01, max_steps=20), seed=0)  # warm-up
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        model.fit(x, y, config=cfg, seed=rep)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def _torch_step_ms(
    torch: Any, net: Any, x: np.ndarray, y: np.ndarray, steps: int, reps: int
) -> float:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(x)

    def run(count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        done = 0
        while done < count:
            order = torch.from_numpy(rng.permutation(n))
            for begin in range(0, n, 32):
                if done >= count:
                    break
                idx = order[begin : begin + 32]
                opt.zero_grad()
                loss_fn(net(xt[idx]), yt[idx]).backward()
                opt.step()
                done += 1

    run(20, 0)
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        run(steps, rep)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def _torch_nets(torch: Any) -> tuple[Any, Any]:
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    cnn = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    return mlp, cnn


def _child(code: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


_FAMILY_CHILD = (
    _PEAK
    + """
import json, sys
import numpy as np
from edge_sdk.models import OnnxModel, TrainConfig
path, loss, data = sys.argv[1], sys.argv[2], sys.argv[3]
arrays = np.load(data)
x, y = arrays["x"], arrays["y"]
model = OnnxModel.from_file(path, loss=loss)
model.fit(x, y, config=TrainConfig(epochs=1, batch_size=16, lr=0.05), seed=0)
metrics = model.evaluate(x, y)
blob = model.export_onnx()
print(json.dumps({"maxrss_kb": peak_kb(), "parameters": model.layout.size}))
"""
)

_ZOO = Path(__file__).resolve().parent.parent / "examples" / "zoo"


def _load_families() -> Any:
    spec = importlib.util.spec_from_file_location("edgefl_zoo_families", _ZOO / "families.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_ZOO / 'families.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _family_figures(torch: Any, quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Speed, memory and parity of every zoo family (or ``only`` those; see the docstring)."""
    fam = _load_families()
    from edge_sdk.models import export_torch

    steps, reps = (20, 2) if quick else (400, 5)
    out: dict[str, Any] = {}
    default_threads = torch.get_num_threads()
    thread_counts = [1] if quick else sorted({1, default_threads})
    for name, family in fam.FAMILIES.items():
        if only is not None and name not in only:
            continue
        entry: dict[str, Any] = {}
        misses: list[str] = []
        try:
            result = fam.parity(name)
            entry["parity_max_abs"] = float(f"{result.max_abs:.3g}")
            if not result.all_trainable:
                misses.append("not every parameter is trainable")
            if result.max_abs > 1e-4:
                misses.append(f"parity {result.max_abs:.2e} > 1e-4")
            net, x, y = fam.build(name)
            proto = export_torch(net, torch.from_numpy(x[:2]))
            model = OnnxModel(proto, loss=family.loss)
            cfg = TrainConfig(epochs=10_000, batch_size=16, lr=0.01, max_steps=steps)
            model.fit(x, y, config=TrainConfig(batch_size=16, lr=0.01, max_steps=10), seed=0)
            times = []
            for rep in range(reps):
                start = time.perf_counter()
                model.fit(x, y, config=cfg, seed=rep)
                times.append((time.perf_counter() - start) / steps * 1e3)
            onnx_ms = statistics.median(times)
            best = math.inf
            for threads in thread_counts:
                torch.set_num_threads(threads)
                net, x, y = fam.build(name)
                best = min(best, _torch_family_ms(torch, fam, net, x, y, family.loss, steps, reps))
            torch.set_num_threads(default_threads)
            entry["onnx_step_ms"] = round(onnx_ms, 4)
            entry["torch_step_ms"] = round(best, 4)
            speedup = best / onnx_ms
            entry["speedup_vs_torch"] = round(speedup, 3)
            if speedup < 1.0:
                misses.append(
                    f"speed-up {speedup:.2f} < 1.0: PyTorch runs this small model faster "
                    "(edgefl's graph has more, smaller kernels)"
                )
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.onnx"
                path.write_bytes(proto.SerializeToString())
                data = Path(tmp) / "data.npz"
                np.savez(data, x=x, y=y)
                child = _child(_FAMILY_CHILD, str(path), family.loss, str(data))
            peak = child["maxrss_kb"] / 1024
            entry["peak_rss_mb"] = round(peak, 1)
            entry["parameters"] = child["parameters"]
            if peak > 120:
                misses.append(f"peak RSS {peak:.0f} MB > 120 MB")
        except Exception as exc:  # one broken family must not hide the others
            misses.append(f"{type(exc).__name__}: {exc}")
        entry["misses"] = misses
        out[name] = entry
    return out


def _torch_family_ms(
    torch: Any, fam: Any, net: Any, x: np.ndarray, y: np.ndarray, loss: str, steps: int, reps: int
) -> float:
    fam.train_mode(net)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = fam.torch_loss(loss)
    n = len(x)

    def go(count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        done = 0
        while done < count:
            order = torch.from_numpy(rng.permutation(n))
            for begin in range(0, n, 16):
                if done >= count:
                    break
                idx = order[begin : begin + 16]
                opt.zero_grad()
                loss_fn(net(xt[idx]), yt[idx]).backward()
                opt.step()
                done += 1

    go(10, 0)
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        go(steps, rep)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def run(quick: bool) -> dict[str, Any]:
    """Measure and return the figures (see the module docstring)."""
    x, y = _digits()
    steps, reps = (100, 3) if quick else (2000, 5)
    onnx_mlp = _onnx_step_ms(zoo.digits_mlp(), x, y, steps, reps)
    onnx_cnn = _onnx_step_ms(zoo.digits_cnn(), x, y, steps // 2, reps)

    torch_mlp: float | None = None
    torch_cnn: float | None = None
    torch_version: str | None = None
    torch_threads: int | None = None
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch_version = str(torch.__version__)
        default_threads = torch.get_num_threads()
        best: dict[str, tuple[float, int]] = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            mlp, cnn = _torch_nets(torch)
            for key, net, count in (("mlp", mlp, steps), ("cnn", cnn, steps // 2)):
                ms = _torch_step_ms(torch, net, x, y, count, reps)
                if key not in best or ms < best[key][0]:
                    best[key] = (ms, threads)
        torch.set_num_threads(default_threads)
        torch_mlp, torch_threads = best["mlp"]
        torch_cnn = best["cnn"][0]

    round_stats = _child(_ROUND_CHILD, "500" if quick else "2000")
    baseline = _child(_BASELINE_CHILD)
    peak_mb = round_stats["maxrss_kb"] / 1024

    speedup = None if torch_mlp is None else torch_mlp / onnx_mlp
    figures: dict[str, Any] = {
        "onnx_step_ms": round(onnx_mlp, 4),
        "torch_step_ms": None if torch_mlp is None else round(torch_mlp, 4),
        "onnx_vs_torch_speedup": None if speedup is None else round(speedup, 3),
        "torch_threads": torch_threads,
        "torch_version": torch_version,
        "onnx_cnn_step_ms": round(onnx_cnn, 4),
        "torch_cnn_step_ms": None if torch_cnn is None else round(torch_cnn, 4),
        "onnx_cnn_vs_torch_speedup": None if torch_cnn is None else round(torch_cnn / onnx_cnn, 3),
        "mlp_parameters": 4810,
        "batch_size": 32,
        "peak_rss_mb": round(peak_mb, 1),
        "baseline_rss_mb": round(baseline["maxrss_kb"] / 1024, 1),
        "rss_round_parameters": round_stats["parameters"],
    }
    targets: dict[str, Any] = {
        "peak_rss_mb": {
            "value": figures["peak_rss_mb"],
            "target": "<= 120 MB for a 50k-parameter MLP round",
            "met": peak_mb <= 120,
        }
    }
    if speedup is not None:
        targets["onnx_vs_torch_speedup"] = {
            "value": figures["onnx_vs_torch_speedup"],
            "target": ">= 1.0 (at least as fast as PyTorch CPU)",
            "met": speedup >= 1.0,
        }
    families: dict[str, Any] | None = None
    if torch is not None:
        families = _family_figures(torch, quick)
        targets["families"] = {
            "target": "speedup_vs_torch >= 1.0, peak_rss_mb <= 120, parity_max_abs <= 1e-4",
            "met": all(not f["misses"] for f in families.values()),
            "misses": {k: f["misses"] for k, f in families.items() if f["misses"]},
        }
    figures["families"] = families
    figures["targets"] = targets
    return figures
