"""`xmoe train --nproc N --ep-size K`: torchrun launch end to end, and the errors a user meets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xmoe.cli.launch import _without_nproc


def test_nproc_is_dropped_from_the_relaunched_command() -> None:
    argv = ["train", "--nproc", "2", "--ep-size", "2", "--nproc=3", "--out", "x"]
    assert _without_nproc(argv) == ["train", "--ep-size", "2", "--out", "x"]


def _xmoe(*args: str, timeout: int = 240):
    return subprocess.run([sys.executable, "-m", "xmoe", *args], capture_output=True, text=True, timeout=timeout)


def test_ep_size_without_processes_is_a_clear_error(tmp_path) -> None:
    result = _xmoe("train", "--preset", "debug-xmoe", "--out", str(tmp_path / "run"), "--ep-size", "2")
    assert result.returncode == 2
    assert "--ep-size 2 needs several processes: add --nproc N" in result.stderr


def test_train_on_two_processes_then_evaluate_in_one(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus with experts and tokens" for i in range(300)))
    run = tmp_path / "run"
    common = [f"--data.path={corpus}", "--data.vocab_size=300", f"--data.cache_dir={tmp_path / 'cache'}",
              "--train.max_steps=2", "--train.batch_size=2", "--train.seq_len=16", "--train.eval_batches=1",
              "--train.device=cpu"]
    result = _xmoe("train", "--nproc", "2", "--ep-size", "2", "--preset", "debug-xmoe", "--out", str(run), *common)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("training debug-xmoe") == 1  # rank 0 alone speaks
    assert "on 2 ranks (ep 2)" in result.stdout
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    result = _xmoe("eval", "--checkpoint", str(run), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["tokens"] > 0


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_nproc_below_one_is_rejected(tmp_path, bad: str) -> None:
    result = _xmoe("train", "--nproc", bad, "--preset", "debug-xmoe", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "--nproc must be >= 1" in result.stderr
