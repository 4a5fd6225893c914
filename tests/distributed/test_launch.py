"""`xmoe train --nproc N --ep-size K`: torchrun launch end to end, and the errors a user meets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xmoe.cli.lm import _without_nproc


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
    assert "returned a view tensor" not in result.stderr  # FSDP2's notice, about outputs xmoe never edits in place
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    result = _xmoe("eval", "--checkpoint", str(run), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["tokens"] > 0


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_nproc_below_one_is_rejected(tmp_path, bad: str) -> None:
    result = _xmoe("train", "--nproc", bad, "--preset", "debug-xmoe", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "--nproc must be >= 1" in result.stderr


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # ended while we looked
            pass
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_launcher_stops_every_rank_after_a_coordinated_save(tmp_path, signum, status) -> None:
    """Item 8: the launcher passes SIGINT and SIGTERM on to torchrun and both ranks, waits for
    the ranks' save, exits 128 + the signal, and the advice to resume names --nproc and --ep-size."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus with experts and tokens" for i in range(300)))
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "xmoe", "train", "--nproc", "2", "--ep-size", "2", "--preset", "debug-xmoe",
         "--out", str(run), f"--data.path={corpus}", "--data.vocab_size=300", f"--data.cache_dir={tmp_path / 'c'}",
         "--train.max_steps=100000", "--train.batch_size=2", "--train.seq_len=16", "--train.log_every=1",
         "--train.save_every=0", "--train.eval_every=0", "--train.device=cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.5)
    launcher.send_signal(signum)
    out, err = launcher.communicate(timeout=180)
    assert launcher.returncode == status, err[-3000:]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert 2 <= state["step"] < 100000 and state["world_size"] == 2
    assert f"continue with: xmoe train --nproc 2 --ep-size 2 --out {run} --resume" in out
    assert "Traceback" not in err  # torchrun's SignalException does not follow that advice
    assert _processes_naming(str(run)) == []  # no rank or torchrun left training
