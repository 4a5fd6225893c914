"""xmoe.training: one loop for every model, with configs, checkpoints and the LM task."""

from .checkpoint import (
    CheckpointError,
    checkpoint_dir,
    consolidate_checkpoint,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from .config import LMRunConfig, TrainConfig, apply_overrides, from_dict, lm_run_config, parse_overrides, to_dict
from .lm import LMEval, LMTask, LoadedLM, eval_batches, evaluate_lm, load_lm, train_lm
from .loop import TrainResult, read_metrics, train
from .mt import MTRunConfig, MTTask, evaluate_mt, load_mt, mt_run_config, train_mt, translate

__all__ = [
    "CheckpointError", "LMEval", "LMRunConfig", "LMTask", "LoadedLM", "TrainConfig", "TrainResult",
    "apply_overrides", "checkpoint_dir", "eval_batches", "evaluate_lm", "from_dict", "lm_run_config",
    "consolidate_checkpoint", "load_checkpoint", "load_lm", "parse_overrides", "read_config", "read_metrics", "save_checkpoint",
    "to_dict", "train", "train_lm",
    "MTRunConfig", "MTTask", "evaluate_mt", "load_mt", "mt_run_config", "train_mt", "translate",
]
