"""What a run does when things go wrong: signals, a second run on the same folder, corrupt or
foreign checkpoint files, a full disk, a failed start. Signals are real (``os.kill``), either
to this process at a chosen moment or to an ``xmoe train`` subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from xmoe.data import DataConfig
from xmoe.training import TrainConfig, lm_run_config, load_lm, train_lm
from xmoe.training import lm as lm_module
from xmoe.training import loop as loop_module


@pytest.fixture
def corpus(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while experts route tokens".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=gen)) for _ in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def tiny_config(corpus, tmp_path, **train):
    train = {"max_steps": 6, "batch_size": 4, "seq_len": 32, "eval_every": 0, "save_every": 0,
             "log_every": 1, "eval_batches": 2, "lr": 3e-3, **train}
    return lm_run_config(
        "debug-xmoe",
        data=DataConfig(path=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(**train),
        overrides={"model.dropout": "0.1"},
    )


def saved_step(run: Path) -> int:
    return json.loads((run / "checkpoint" / "state.json").read_text())["step"]


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_lm(run_a).model.state_dict(), load_lm(run_b).model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- signals ---------------------------------------------------------------------------------


def kill_after_optimizer_step(n: int, signum: int):
    """Send ``signum`` to this process inside the n-th optimizer.step() (1-based): the moment a
    KeyboardInterrupt used to escape between the update and the step count."""
    calls = {"n": 0}

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)

    return register_optimizer_step_post_hook(hook)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_the_optimizer_step_saves_that_step_and_resume_is_exact(corpus, tmp_path, signum):
    """Item 2: the checkpoint must say step 3 when the weights hold step 3's update, so the
    resumed run ends bit-identical to an uninterrupted one (an update applied twice would not)."""
    cfg = tiny_config(corpus, tmp_path)
    whole = train_lm(cfg, tmp_path / "whole", progress=False)
    handle = kill_after_optimizer_step(3, signum)
    try:
        first = train_lm(cfg, tmp_path / "split", progress=False)
    finally:
        handle.remove()
    assert first.interrupted and first.signal == signum and first.steps == 3
    assert saved_step(tmp_path / "split") == 3
    second = train_lm(cfg, tmp_path / "split", resume=True, progress=False)
    assert first.train_losses + second.train_losses == whole.train_losses
    assert_same_weights(tmp_path / "whole", tmp_path / "split")


def test_a_second_signal_during_the_save_is_ignored(corpus, tmp_path, monkeypatch):
    """Item 11: Ctrl-C pressed again while the interrupt's checkpoint is written."""
    original = loop_module.save_checkpoint

    def save_while_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_while_interrupted)
    handle = kill_after_optimizer_step(2, signal.SIGINT)
    try:
        result = train_lm(tiny_config(corpus, tmp_path), tmp_path / "run", progress=False)
    finally:
        handle.remove()
    assert result.interrupted and result.steps == 2 and result.signal == signal.SIGINT
    assert saved_step(tmp_path / "run") == 2


def test_a_signal_during_the_final_evaluation_skips_it_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    """Item 11: the final evaluation stops at once; the finished run is already saved."""
    evaluations = []

    def evaluate(self, model):
        evaluations.append("started")
        os.kill(os.getpid(), signal.SIGINT)
        evaluations.append("not interrupted")  # never reached: the signal raises at once
        return {}

    monkeypatch.setattr(lm_module.LMTask, "evaluate", evaluate)
    result = train_lm(tiny_config(corpus, tmp_path, max_steps=3), tmp_path / "run", progress=False)
    assert evaluations == ["started"]
    assert result.interrupted and result.steps == 3 and result.final_eval == {}
    assert saved_step(tmp_path / "run") == 3


def xmoe(*args: str, cwd: Path, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "xmoe", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_training(run: Path, process: subprocess.Popen, timeout: float = 120, rows: int = 1) -> None:
    """Until the run's metrics file has ``rows`` rows (a resume keeps the rows of its checkpoint)."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def train_args(corpus: Path, run: Path, tmp_path: Path, steps: int = 100_000) -> list[str]:
    return ["train", "--preset", "debug-xmoe", "--data", str(corpus), "--out", str(run),
            f"--train.max_steps={steps}", "--train.batch_size=4", "--train.seq_len=32", "--train.log_every=1",
            "--train.eval_every=0", "--train.save_every=0", "--data.vocab_size=300",
            f"--data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_xmoe_train_saves_and_exits_on_sigterm_and_sigint(corpus, tmp_path, signum, code):
    """Item 1: SIGTERM (schedulers, `timeout`) saves at a step boundary like Ctrl-C, says so,
    and exits 143 (130 for SIGINT)."""
    run = tmp_path / "run"
    process = xmoe(*train_args(corpus, run, tmp_path), cwd=tmp_path)
    wait_for_training(run, process)
    os.kill(process.pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    name = signal.Signals(signum).name
    assert f"{name} received" in err and "Traceback" not in err
    step = saved_step(run)
    assert step >= 1 and f"interrupted by {name}: checkpoint saved at step {step}" in out


# --- one run per folder ----------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(corpus, tmp_path):
    """Item 3: two processes on one --out; the second (new or --resume) stops with the holder."""
    run = tmp_path / "run"
    train_lm(tiny_config(corpus, tmp_path, max_steps=2), run, progress=False)
    first = xmoe(*train_args(corpus, run, tmp_path), "--resume", cwd=tmp_path)
    try:
        wait_for_training(run, first, rows=4)  # 2 train rows, the final evaluation, a resumed step
        for extra in ([], ["--resume"]):
            second = subprocess.run([sys.executable, "-m", "xmoe", *train_args(corpus, run, tmp_path), *extra],
                                    cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"in use by another run (process {first.pid} on" in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one writer, no interleaving


def test_the_lock_is_released_when_its_holder_dies(corpus, tmp_path):
    run = tmp_path / "run"
    first = xmoe(*train_args(corpus, run, tmp_path), cwd=tmp_path)
    wait_for_training(run, first)
    first.kill()  # SIGKILL: no handler runs, the kernel drops the lock
    first.communicate()
    r = subprocess.run([sys.executable, "-m", "xmoe", *train_args(corpus, run, tmp_path, steps=2)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # no checkpoint was saved by the killed run: a new run may start


def test_leftover_checkpoint_temporaries_are_removed_on_the_next_start(corpus, tmp_path):
    """Item 6: a kill -9 inside a save leaves .checkpoint-XXXX; the next start removes it."""
    cfg = tiny_config(corpus, tmp_path, max_steps=2)
    train_lm(cfg, tmp_path / "run", progress=False)
    stale = tmp_path / "run" / ".checkpoint-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    from xmoe.training import apply_overrides

    train_lm(apply_overrides(cfg, {"train.max_steps": "3"}), tmp_path / "run", resume=True, progress=False)
    assert not stale.exists()


def test_a_failed_start_leaves_the_folder_as_it_found_it(corpus, tmp_path):
    """Item 5: a start that fails (too little text) must not leave a tokenizer that the next
    run in that folder would silently reuse."""
    short = tmp_path / "short.txt"
    short.write_text("too little text\n" * 3)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for run in (tmp_path / "new", existing):
        with pytest.raises(ValueError):
            train_lm(tiny_config(short, tmp_path), run, progress=False)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    result = train_lm(tiny_config(corpus, tmp_path, max_steps=1), existing, progress=False)
    assert result.steps == 1
    assert load_lm(existing).cfg.model.vocab_size == 300  # trained on the new text, not the failed start's
