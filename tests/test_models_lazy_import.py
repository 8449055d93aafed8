"""The ONNX parts of edge_sdk.models load on first use, not with the package."""

from __future__ import annotations

import subprocess
import sys

_CHECK = """
import sys
from edge_sdk.models import LinearRegression, TrainConfig
import aggregator.config, aggregator.service, aggregator.keyholder_service
assert "onnx" not in sys.modules and "onnxruntime" not in sys.modules, "loaded eagerly"
import edge_sdk.models as models
from edge_sdk.models import OnnxModel, UntrainableWeightError
assert "onnx" in sys.modules
assert models.OnnxModel is OnnxModel and models.LOSSES
try:
    models.NoSuchThing
except AttributeError as exc:
    assert "NoSuchThing" in str(exc)
else:
    raise AssertionError("an unknown name must raise AttributeError")
print("ok")
"""


def test_onnx_parts_load_on_first_use() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
