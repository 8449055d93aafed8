"""The device agent: session state machine, outbox, configuration and driver.

``DeviceSession`` holds the protocol logic without I/O; ``DeviceAgent``
drives it with a transport, the disk (ledger, outbox, model) and a trainer.
"""

from edge_sdk.agent.config import DeviceConfig, load_device_config
from edge_sdk.agent.outbox import Outbox
from edge_sdk.agent.runner import AgentHalt, AgentHooks, DeviceAgent, run_device, transport_config
from edge_sdk.agent.session import DeviceSession, OutboxEntry, Phase
from edge_sdk.agent.trainer import (
    EvaluateResult,
    FitResult,
    ModelTrainer,
    Trainer,
    TrainerContractError,
    TrainResult,
    check_round_training,
    load_trainer,
    train_config_from,
)

__all__ = [
    "AgentHalt",
    "AgentHooks",
    "DeviceAgent",
    "DeviceConfig",
    "DeviceSession",
    "EvaluateResult",
    "FitResult",
    "ModelTrainer",
    "Outbox",
    "OutboxEntry",
    "Phase",
    "TrainResult",
    "Trainer",
    "TrainerContractError",
    "check_round_training",
    "load_device_config",
    "load_trainer",
    "run_device",
    "train_config_from",
    "transport_config",
]
