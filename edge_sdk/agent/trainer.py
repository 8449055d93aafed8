"""Adapters from edge_sdk.models to the agent's :class:`Trainer` interface."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.agent.runner import FloatVec, TrainResult
from edge_sdk.models import Model, TrainConfig

__all__ = ["ModelTrainer", "train_config_from"]

_TRAIN_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "prox_mu", "max_steps")


def train_config_from(settings: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from a round's ``train`` pairs over ``base`` defaults.

    Unknown keys are ignored (a newer aggregator may send more); known keys
    are validated by TrainConfig itself.
    """
    values = {
        k: getattr(base or TrainConfig(), k)
        for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "prox_mu", "max_steps")
    }
    values.update({k: settings[k] for k in _TRAIN_KEYS if k in settings})
    return TrainConfig(**values)


class ModelTrainer:
    """Trains a :class:`~edge_sdk.models.Model` on this device's local data.

    Args:
        model: the local model (its layout must match the global model's).
        x: local features.
        y: local labels/targets.
        base: training defaults that round settings override.
    """

    def __init__(
        self,
        model: Model,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        base: TrainConfig | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if len(x) == 0:
            raise ValueError("a device needs at least one local example")
        self.model = model
        self.x = x
        self.y = y
        self.base = base

    @property
    def num_params(self) -> int:
        """Length of the model's flat weight vector."""
        return int(self.model.layout.size)

    def train(self, weights: FloatVec, config: Mapping[str, Any], seed: int) -> TrainResult:
        """Set ``weights``, fit on the local data, return the new flat weights."""
        self.model.set_flat(weights)
        prox = "prox_mu" in config and float(config["prox_mu"]) > 0
        report = self.model.fit(
            self.x,
            self.y,
            config=train_config_from(config, self.base),
            seed=seed,
            global_weights=weights if prox else None,
        )
        metrics = {"loss": float(report.final_loss)}
        return TrainResult(
            weights=np.asarray(self.model.get_flat(), dtype=np.float32), metrics=metrics
        )
