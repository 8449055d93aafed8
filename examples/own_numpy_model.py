"""Federate your own numpy model: write fit and evaluate, edgefl owns the loop.

Trust assumptions: as for any device (examples/device.toml); the data never
leaves the device, only the clipped, noised, encrypted update does. Run it
either way:

    python examples/own_numpy_model.py device.toml     # this script
    edgefl device run --config device.toml             # with, in [training]:
        model = "own_numpy_model:LeastSquares"         # (module on PYTHONPATH)
        data = "/var/lib/edgefl/data.npz"              # passed as LeastSquares(data=...)
"""

import sys

import numpy as np

from edge_sdk import EvaluateResult, FitResult, load_device_config, run_device


class LeastSquares:
    """Linear least squares (x @ w ~ y) trained by gradient descent on local data."""

    def __init__(self, data: str) -> None:
        with np.load(data) as arrays:
            self.x, self.y = arrays["x"].astype(float), arrays["y"].astype(float)
        self.num_params = self.x.shape[1]

    def loss_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean squared error and its gradient at ``w``."""
        err = self.x @ w - self.y
        return float(np.mean(err**2)), 2 * self.x.T @ err / len(self.y)

    def fit(self, weights: np.ndarray, config: dict, *, seed: int) -> FitResult:
        """Train from the global weights; return the new ones."""
        w = weights.astype(float)
        for _ in range(int(config.get("epochs", 1))):
            w -= float(config.get("lr", 0.1)) * self.loss_grad(w)[1]
        loss = self.loss_grad(w)[0]
        return FitResult(weights=w, num_examples=len(self.y), metrics={"loss": loss})

    def evaluate(self, weights: np.ndarray) -> EvaluateResult:
        """Loss of the global weights on local data."""
        return EvaluateResult(loss=self.loss_grad(weights)[0], num_examples=len(self.y))


if __name__ == "__main__":
    config = load_device_config(sys.argv[1])
    sys.exit(run_device(LeastSquares(config.training["data"]), config))
