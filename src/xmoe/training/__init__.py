"""xmoe.training: one loop and one run for every task (language modelling, translation), with
configs, checkpoints and reports."""

from .checkpoint import (
    CheckpointError,
    checkpoint_dir,
    consolidate_checkpoint,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from .config import LMRunConfig, TrainConfig, apply_overrides, from_dict, lm_run_config, to_dict
from .lm import LMEval, LMTask, eval_batches, evaluate_lm, load_lm, train_lm
from .loop import TrainResult, train
from .metrics import read_metrics
from .mt import MTRunConfig, MTTask, evaluate_mt, load_mt, mt_run_config, train_mt, translate
from .runs import LoadedRun, TaskKind, load_run, train_task

__all__ = [
    "CheckpointError", "LMEval", "LMRunConfig", "LMTask", "LoadedRun", "TrainConfig", "TrainResult",
    "apply_overrides", "checkpoint_dir", "eval_batches", "evaluate_lm", "from_dict", "lm_run_config",
    "consolidate_checkpoint", "load_checkpoint", "load_lm", "read_config", "read_metrics", "save_checkpoint",
    "TaskKind", "load_run", "to_dict", "train", "train_lm", "train_task",
    "MTRunConfig", "MTTask", "evaluate_mt", "load_mt", "mt_run_config", "train_mt", "translate",
]
