"""Ranks that fail together (2 gloo processes, 127.0.0.1): a stop signal on one rank stops every
rank after the same step with one save; a rank killed with SIGKILL ends the others within the
collective timeout, with a message saying so, and the last checkpoint still loads."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from helpers import distributed as workers
from xmoe.data import DataConfig
from xmoe.models.gpt import GPT
from xmoe.training import TrainConfig, checkpoint_dir, to_dict
from xmoe.tasks.lm import lm_run_config, load_lm
from xmoe.training.checkpoint import read_state

TIMEOUT_S = 15.0  # the collective timeout these runs set: the bound on noticing a silent rank


@pytest.fixture
def corpus(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while experts route tokens".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=gen)) for _ in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def _config(corpus, tmp_path, *, save_every: int):
    train = TrainConfig(max_steps=100_000, batch_size=2, seq_len=16, eval_every=0, save_every=save_every,
                        log_every=1, eval_batches=1, device="cpu", collective_timeout_s=TIMEOUT_S)
    return lm_run_config("debug-xmoe", data=DataConfig(path=str(corpus), vocab_size=300,
                                                       cache_dir=str(tmp_path / "cache")), train=train)


def _start(corpus, tmp_path, *, save_every: int):
    run = tmp_path / "run"
    context = workers.spawn(workers.run_until_stopped, 2, to_dict(_config(corpus, tmp_path, save_every=save_every)),
                            str(run), 2, join=False, timeout_s=TIMEOUT_S)
    return run, context


def _wait_for(condition, what: str, context, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.is_alive() for p in context.processes), f"a rank ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _train_rows(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _report(run, rank: int) -> dict:
    return json.loads((run.parent / f"stopped-rank{rank}.json").read_text())


def _end(context) -> None:
    for process in context.processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step_and_saves_once(corpus, tmp_path):
    run, context = _start(corpus, tmp_path, save_every=0)
    try:
        _wait_for(lambda: _train_rows(run) >= 3, "training", context)
        os.kill(context.processes[1].pid, signal.SIGTERM)  # rank 1 alone: rank 0 hears of it from rank 1
        for process in context.processes:
            process.join(timeout=120)
        assert [p.exitcode for p in context.processes] == [0, 0]
    finally:
        _end(context)
    first, second = _report(run, 0), _report(run, 1)
    assert first["steps"] == second["steps"] >= 3
    assert second["signal"] == signal.SIGTERM and first["signal"] == signal.SIGINT  # stopped with the others
    assert first["saves"] == second["saves"] == [first["steps"]]  # one save, the same step on every rank
    assert read_state(checkpoint_dir(run))["step"] == first["steps"]
    assert not list(run.glob(".checkpoint-*"))  # no half-written checkpoint left behind


def test_a_killed_rank_ends_the_other_within_the_timeout_and_the_last_checkpoint_loads(corpus, tmp_path):
    run, context = _start(corpus, tmp_path, save_every=2)
    try:
        _wait_for(lambda: (run / "checkpoint" / "state.json").is_file(), "checkpoint", context)
        killed = time.time()
        os.kill(context.processes[1].pid, signal.SIGKILL)
        context.processes[0].join(timeout=TIMEOUT_S + 60)
        assert context.processes[0].exitcode == 1, "rank 0 did not stop"
    finally:
        _end(context)
    report = _report(run, 0)
    assert report["at"] - killed < TIMEOUT_S + 5
    assert "lost contact with another rank" in report["error"], report["error"]
    assert "--resume" in report["error"]
    step = read_state(checkpoint_dir(run))["step"]
    assert step >= 2 and step % 2 == 0
    loaded = load_lm(run, device="cpu")  # the last checkpoint loads in one process: trained weights
    torch.manual_seed(loaded.cfg.train.seed)
    initial = GPT(loaded.cfg.model).state_dict()
    trained = loaded.model.state_dict()
    assert trained.keys() == initial.keys() and all(torch.isfinite(v).all() for v in trained.values())
    assert not all(torch.equal(trained[k], initial[k]) for k in initial)


@pytest.mark.slow
def test_a_hung_rank_ends_the_other_after_the_collective_timeout(corpus, tmp_path):
    """SIGSTOP: the process is alive and silent, so only the timeout can tell."""
    run, context = _start(corpus, tmp_path, save_every=0)
    try:
        _wait_for(lambda: _train_rows(run) >= 2, "training", context)
        stopped = time.time()
        os.kill(context.processes[1].pid, signal.SIGSTOP)
        context.processes[0].join(timeout=TIMEOUT_S + 60)
        assert context.processes[0].exitcode == 1, "rank 0 did not stop"
    finally:
        os.kill(context.processes[1].pid, signal.SIGKILL)
        _end(context)
    report = _report(run, 0)
    assert TIMEOUT_S - 1 < report["at"] - stopped < TIMEOUT_S + 10
    assert "lost contact with another rank" in report["error"] and "no checkpoint was saved" in report["error"]
