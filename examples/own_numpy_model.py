"""Federate your own numpy model: implement the three-member Trainer, the agent owns the loop.

Trust assumptions: as for any device (examples/device.toml); the data never
leaves the device, only the clipped, noised, encrypted update does. Run it
either way:

    python examples/own_numpy_model.py device.toml          # this script's main
    edgefl device run --config device.toml                  # with, in [training]:
        model = "own_numpy_model:make_trainer"              # (module on PYTHONPATH)
        data = "/var/lib/edgefl/data.npz"                   # passed to make_trainer
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk import DeviceAgent, EvaluateResult, FitResult, load_device_config
from edge_sdk.agent import transport_config
from edge_sdk.transport import MqttTransport


class LeastSquares:
    """Linear least squares (x @ w ~ y) trained by gradient descent on local data."""

    def __init__(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
        self.x, self.y, self.num_params = x.astype(np.float64), y.astype(np.float64), x.shape[1]

    def _loss_grad(self, w: npt.NDArray[Any]) -> tuple[float, npt.NDArray[Any]]:
        err = self.x @ w - self.y
        return float(np.mean(err**2)), 2 * self.x.T @ err / len(self.y)

    def fit(self, weights: npt.NDArray[Any], config: Mapping[str, Any], *, seed: int) -> FitResult:
        """Train from the global weights; return the new ones."""
        w = weights.astype(np.float64)
        for _ in range(int(config.get("epochs", 1))):
            w -= float(config.get("lr", 0.1)) * self._loss_grad(w)[1]
        return FitResult(
            weights=w, num_examples=len(self.y), metrics={"loss": self._loss_grad(w)[0]}
        )

    def evaluate(self, weights: npt.NDArray[Any]) -> EvaluateResult:
        """Loss of the global weights on local data."""
        return EvaluateResult(loss=self._loss_grad(weights)[0], num_examples=len(self.y))


def make_trainer(data: str) -> LeastSquares:
    with np.load(data) as arrays:
        return LeastSquares(arrays["x"], arrays["y"])


if __name__ == "__main__":
    config = load_device_config(sys.argv[1])
    trainer = make_trainer(config.training["data"])
    sys.exit(DeviceAgent(config, trainer, MqttTransport(transport_config(config))).run_forever())
