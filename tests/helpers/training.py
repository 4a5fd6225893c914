"""The tiny language-model run config the training tests share."""

from __future__ import annotations

from xmoe.data import DataConfig
from xmoe.training import LMRunConfig, TrainConfig, lm_run_config


def tiny_lm_config(corpus, tmp_path, **train) -> LMRunConfig:
    """debug-xmoe on ``corpus`` for 6 steps (``train`` overrides TrainConfig fields); dropout 0.1,
    so that an exact resume must restore the RNG too."""
    train = {"max_steps": 6, "batch_size": 4, "seq_len": 32, "eval_every": 0, "save_every": 3,
             "log_every": 1, "eval_batches": 2, "lr": 3e-3, **train}
    return lm_run_config(
        "debug-xmoe",
        data=DataConfig(path=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(**train),
        overrides={"model.dropout": "0.1"},
    )
