"""The distributed settings say what is wrong and how to fix it (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from xmoe.distributed import DataParallelConfig, init_from_env, transformer_blocks
from xmoe.models.gpt import GPT
from xmoe.presets import get_preset
from xmoe.training import TrainConfig


@pytest.mark.parametrize("fields, message", [
    (dict(dp_impl="ddp"), "train.dp_impl='ddp' is not one of fsdp, allreduce"),
    (dict(collective_timeout_s=0.0), "train.collective_timeout_s must be a positive number"),
    (dict(collective_timeout_s=float("inf")), "train.collective_timeout_s must be a positive number"),
])
def test_train_config_rejects_bad_distributed_settings(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_data_parallel_rejects_an_unknown_implementation() -> None:
    with pytest.raises(ValueError, match="train.dp_impl='zero3'"):
        DataParallelConfig(impl="zero3")


def test_init_from_env_rejects_a_timeout_that_bounds_nothing(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="collective timeout must be a positive number of seconds"):
        init_from_env(1, "cpu", timeout_s=0)


def test_fsdp_units_are_the_transformer_blocks() -> None:
    model = GPT(get_preset("debug-xmoe"))
    assert transformer_blocks(model) == list(model.blocks)
    stack = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()]))
    assert transformer_blocks(stack) == [stack[0][0]]  # modules without parameters are no unit
