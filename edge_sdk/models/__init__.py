"""Local training: numpy linear models and ONNX models on stock onnxruntime.

Every model implements :class:`Model`: weights as named float32 arrays and as
one flat vector with a stable layout, ``fit`` with SGD (momentum, weight
decay, FedProx), ``evaluate`` and ``predict``. See docs/models.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_sdk._lazy import lazy_attribute
from edge_sdk.models.base import (
    MAX_PROX_MU,
    FloatArray,
    Model,
    SGDTrainable,
    TrainConfig,
    TrainReport,
    WeightLayout,
    WeightSpec,
)
from edge_sdk.models.linear import LinearRegression, LogisticRegression, SoftmaxRegression

if TYPE_CHECKING:
    from edge_sdk.models.onnx_autodiff import (
        LOSSES,
        SUPPORTED_OPERATORS,
        UntrainableWeightError,
        build_training_graph,
        grad_output_name,
    )
    from edge_sdk.models.onnx_model import OnnxModel
    from edge_sdk.models.torch_export import export_torch

# The ONNX parts import onnx (and, to run, onnxruntime): over a second and
# tens of MB that a process using only the linear models or TrainConfig (the
# aggregator, the committee members) should not pay. They load on first use.
_LAZY = {
    "LOSSES": "edge_sdk.models.onnx_autodiff",
    "SUPPORTED_OPERATORS": "edge_sdk.models.onnx_autodiff",
    "UntrainableWeightError": "edge_sdk.models.onnx_autodiff",
    "build_training_graph": "edge_sdk.models.onnx_autodiff",
    "grad_output_name": "edge_sdk.models.onnx_autodiff",
    "OnnxModel": "edge_sdk.models.onnx_model",
    "export_torch": "edge_sdk.models.torch_export",
}


def __getattr__(name: str) -> Any:
    """Import an ONNX part of the package on first use."""
    return lazy_attribute(__name__, _LAZY, name)


__all__ = [
    "LOSSES",
    "MAX_PROX_MU",
    "SUPPORTED_OPERATORS",
    "FloatArray",
    "LinearRegression",
    "LogisticRegression",
    "Model",
    "OnnxModel",
    "SGDTrainable",
    "SoftmaxRegression",
    "TrainConfig",
    "TrainReport",
    "UntrainableWeightError",
    "WeightLayout",
    "WeightSpec",
    "build_training_graph",
    "export_torch",
    "grad_output_name",
]
