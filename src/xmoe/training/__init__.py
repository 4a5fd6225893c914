"""xmoe.training: one loop and one run for every task (xmoe.tasks: language modelling,
translation), with the training config, the metrics log and checkpoints."""

from .checkpoint import (
    CheckpointError,
    checkpoint_dir,
    consolidate_checkpoint,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from .config import TrainConfig, apply_overrides, from_dict, to_dict
from .loop import TrainResult, train
from .metrics import read_metrics
from .runs import LoadedRun, load_run, train_task

__all__ = [
    "CheckpointError", "LoadedRun", "TrainConfig", "TrainResult", "apply_overrides", "checkpoint_dir",
    "consolidate_checkpoint", "from_dict", "load_checkpoint", "load_run", "read_config", "read_metrics",
    "save_checkpoint", "to_dict", "train", "train_task",
]
