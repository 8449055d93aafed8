"""Local training: numpy linear models and ONNX models on stock onnxruntime.

Every model implements :class:`Model`: weights as named float32 arrays and as
one flat vector with a stable layout, ``fit`` with SGD (momentum, weight
decay, FedProx), ``evaluate`` and ``predict``. See docs/models.md.
"""

from __future__ import annotations

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
from edge_sdk.models.onnx_autodiff import (
    LOSSES,
    SUPPORTED_OPERATORS,
    UntrainableWeightError,
    build_training_graph,
    grad_output_name,
)
from edge_sdk.models.onnx_model import OnnxModel
from edge_sdk.models.torch_export import export_torch

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
