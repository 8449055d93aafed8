"""edgefl device SDK: local training, on-device privacy, encryption and transport.

The device's one-call recipe is :func:`build_update` (delta -> clipped,
noised, packed, encrypted, signed update); :class:`DeviceAgent` runs the
whole round loop over MQTT. Heavy modules are imported on first use, so
``import edge_sdk`` (and the ``edgefl`` CLI) stay fast.
"""

from __future__ import annotations

from typing import Any

from edge_sdk._lazy import lazy_attribute
from edge_sdk._version import __version__
from edge_sdk.errors import EdgeFLError

__all__ = [
    "DeviceAgent",
    "DeviceConfig",
    "DeviceIdentity",
    "EdgeFLError",
    "EvaluateResult",
    "FitResult",
    "ModelTrainer",
    "RoundContext",
    "SGDTrainable",
    "Trainer",
    "TrainerContractError",
    "__version__",
    "build_update",
    "load_device_config",
    "run_device",
]

_LAZY = {
    "DeviceAgent": "edge_sdk.agent",
    "DeviceConfig": "edge_sdk.agent",
    "load_device_config": "edge_sdk.agent",
    "run_device": "edge_sdk.agent",
    "EvaluateResult": "edge_sdk.agent",
    "FitResult": "edge_sdk.agent",
    "ModelTrainer": "edge_sdk.agent",
    "Trainer": "edge_sdk.agent",
    "TrainerContractError": "edge_sdk.agent",
    "SGDTrainable": "edge_sdk.models",
    "DeviceIdentity": "edge_sdk.identity",
    "RoundContext": "edge_sdk.pipeline",
    "build_update": "edge_sdk.pipeline",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name)
