"""Which backend and device a torchrun rank joins with: train.device decides, never silently."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from xmoe.distributed import parallel


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port())).items():
        monkeypatch.setenv(key, value)


def test_cpu_device_takes_gloo_even_where_cuda_exists(one_rank, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    par, device = parallel.init_from_env(1, "cpu")
    try:
        assert device == torch.device("cpu") and dist.get_backend() == "gloo"
        assert par.world_size == 1
    finally:
        dist.destroy_process_group()


def test_more_local_ranks_than_gpus_is_a_clear_error(one_rank, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--nproc 1 or --train.device=cpu"):
        parallel.init_from_env(1, "auto")
    assert not dist.is_initialized()


def test_cuda_asked_for_without_cuda(one_rank, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        parallel.init_from_env(1, "cuda")
