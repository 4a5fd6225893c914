"""What a run does when things go wrong: signals, a second run on the same folder, corrupt or
foreign checkpoint files, a full disk, a failed start. Signals are real (``os.kill``), either
to this process at a chosen moment or to an ``xmoe train`` subprocess."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from xmoe.cli.main import main as cli_main
from helpers.data import write_corpus
from helpers.training import recompute_manifest, tiny_lm_config
from xmoe.tasks.lm import lm_run_config, load_lm, train_lm
from xmoe.tasks import lm as lm_module
from xmoe.training import loop as loop_module


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def tiny_config(corpus, tmp_path, **train):
    return tiny_lm_config(corpus, tmp_path, **{"save_every": 0, **train})


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


def test_a_signal_during_a_periodic_save_stops_right_after_it(corpus, tmp_path, monkeypatch):
    """No extra step after a signal that arrives while a periodic checkpoint is written."""
    original, saves = loop_module.save_checkpoint, []

    def save_while_terminated(*args, **kwargs):
        saves.append(kwargs["step"])
        if len(saves) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_while_terminated)
    result = train_lm(tiny_config(corpus, tmp_path, save_every=2), tmp_path / "run", progress=False)
    assert result.signal == signal.SIGTERM and result.steps == 2 and saves == [2]  # saved once, not twice
    assert saved_step(tmp_path / "run") == 2


def test_a_signal_during_the_final_evaluation_skips_it_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    """Item 11: the final evaluation stops at once; the finished run is already saved."""
    evaluations = []

    def evaluate(self, model, ranks):
        evaluations.append("started")
        os.kill(os.getpid(), signal.SIGINT)
        evaluations.append("not interrupted")  # never reached: the signal raises at once
        return {}

    monkeypatch.setattr(lm_module.LanguageModelling, "evaluate", evaluate)
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
    return ["train", "--preset", "debug-xmoe", f"--data.path={corpus}", "--out", str(run),
            f"--train.max_steps={steps}", "--train.batch_size=4", "--train.seq_len=32", "--train.log_every=1",
            "--train.eval_every=0", "--train.save_every=0", "--data.vocab_size=300",
            f"--data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143)])  # SIGINT: the in-process tests above
def test_xmoe_train_saves_and_exits_on_sigterm(corpus, tmp_path, signum, code):
    """Item 1: SIGTERM (schedulers, `timeout`) saves at a step boundary like Ctrl-C, says so,
    and exits 143."""
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


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from xmoe.training.runs import run_folder
with run_folder(Path(sys.argv[1]), resume=True):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    """kill -9 runs no handler; the kernel drops an flock with its holder's last descriptor."""
    from xmoe.training.runs import RunInUseError, run_folder

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunInUseError, match=f"process {holder.pid} on "):
            with run_folder(run, resume=True):
                pass
    finally:
        holder.kill()
        holder.communicate()
    with run_folder(run, resume=True):  # free again
        pass


def test_leftover_checkpoint_temporaries_are_removed_on_the_next_start(corpus, tmp_path):
    """Item 6: a kill -9 inside a save leaves .checkpoint-XXXX; the next start removes it."""
    cfg = tiny_config(corpus, tmp_path, max_steps=2)
    train_lm(cfg, tmp_path / "run", progress=False)
    stale = tmp_path / "run" / ".checkpoint-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    from xmoe.data.files import temporary_name

    half_tokenizer = tmp_path / "run" / temporary_name("tokenizer.json")
    half_tokenizer.write_text("{")
    from xmoe.training import apply_overrides

    with pytest.warns(UserWarning, match="schedule now spans 3 steps"):
        train_lm(apply_overrides(cfg, {"train.max_steps": "3"}), tmp_path / "run", resume=True, progress=False)
    assert not stale.exists() and not half_tokenizer.exists()


def test_a_refused_resume_gives_no_schedule_warning_first(corpus, tmp_path):
    """A resume that changes train.lr is refused; the warning that a larger max_steps moves the
    schedule was printed before that refusal, about a run that never continued."""

    from xmoe.errors import UsageError
    from xmoe.training import apply_overrides
    from xmoe.training.runs import check_resumable

    saved = tiny_config(corpus, tmp_path, max_steps=2)
    changed = apply_overrides(saved, {"train.max_steps": "4", "train.lr": "1e-2"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UsageError, match="these may not change: train.lr"):
            check_resumable(saved, changed, tmp_path, saved_state={"step": 2})


def test_a_new_run_refuses_a_hugging_face_model_folder(corpus, tmp_path):
    """`xmoe train --out hf/a` (an export) trained with the export's tokenizer.json and added a
    checkpoint beside the model's files, after which commands took the folder for a run."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "xmoe"}')
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds a Hugging Face model .* choose another --out"):
        train_lm(tiny_config(corpus, tmp_path), folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]


def test_a_new_run_says_it_reuses_a_tokenizer_left_in_its_folder(corpus, tmp_path):
    """A run whose checkpoint was deleted leaves its tokenizer.json; a new run in that folder on
    other text trained with it without a word."""
    run = tmp_path / "run"
    train_lm(tiny_config(corpus, tmp_path, max_steps=1), run, progress=False)
    shutil.rmtree(run / "checkpoint")
    with pytest.warns(UserWarning, match="tokenizer.json is left from an earlier run; this new run trains with it"):
        train_lm(tiny_config(corpus, tmp_path, max_steps=1), run, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh folder: nothing to say
        train_lm(tiny_config(corpus, tmp_path, max_steps=1), tmp_path / "fresh", progress=False)


def test_sigterm_while_starting_cleans_up_like_a_failed_start(corpus, tmp_path, monkeypatch):
    """Item 5 with a signal: SIGTERM while the data is prepared (a tokenizer already written)
    used to end the process at once, leaving the tokenizer for the next run to reuse."""
    from xmoe.training.stopping import Stopped

    original = lm_module.prepare_lm_data

    def prepare_then_terminated(cfg, run_dir):
        data = original(cfg, run_dir)
        assert (Path(run_dir) / "tokenizer.json").is_file()
        os.kill(os.getpid(), signal.SIGTERM)
        return data

    monkeypatch.setattr(lm_module, "prepare_lm_data", prepare_then_terminated)
    with pytest.raises(Stopped) as stopped:
        train_lm(tiny_config(corpus, tmp_path), tmp_path / "run", progress=False)
    assert stopped.value.signum == signal.SIGTERM
    assert not (tmp_path / "run").exists()


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


# --- corrupt, edited and foreign checkpoint files --------------------------------------------


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A finished tiny run, trained once for the tests of this section (they edit copies)."""
    root = tmp_path_factory.mktemp("finished")
    write_corpus(root / "corpus.txt")
    train_lm(tiny_config(root / "corpus.txt", root, max_steps=2), root / "run", progress=False)
    return root


@pytest.fixture
def finished_run(trained_once, tmp_path, corpus):
    """Copies of the finished run (made with the same text as ``corpus``)."""

    assert corpus.read_text() == (trained_once / "corpus.txt").read_text()

    def copy(name: str) -> Path:
        shutil.copytree(trained_once / "run", tmp_path / name)
        return tmp_path / name

    return copy


def flip_a_bit(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def resume(run: Path):
    from xmoe.training import apply_overrides
    from xmoe.tasks.lm import LanguageModelling
    from xmoe.training.runs import saved_config

    cfg = saved_config(run, LanguageModelling)  # two more steps on the run's schedule (no warning)
    extend = {"train.max_steps": "4", "train.schedule_steps": str(cfg.train.max_steps)}
    return train_lm(apply_overrides(cfg, extend), run, resume=True, progress=False)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.json"])
def test_a_flipped_bit_in_any_checkpoint_file_is_refused_naming_it(corpus, tmp_path, finished_run, name):
    """Item 4: safetensors and torch.save have no checksum of their own; the manifest does."""
    from xmoe.training import CheckpointError

    run = finished_run("run")
    flip_a_bit(run / "checkpoint" / name, offset_from_end=3 if name.endswith(".json") else 100)
    with pytest.raises(CheckpointError, match=f"{name} does not match the checksum"):
        resume(run)


def test_another_runs_weights_with_the_same_shapes_are_refused(corpus, tmp_path, finished_run):
    """Item 4: same preset and shapes, another config (seed): the weights name their config."""

    from xmoe.training import CheckpointError

    run, other = finished_run("run"), tmp_path / "other"
    train_lm(tiny_config(corpus, tmp_path, max_steps=2, seed=1), other, progress=False)
    shutil.copy(other / "checkpoint" / "model.safetensors", run / "checkpoint" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not match the checksum"):
        load_lm(run)
    recompute_manifest(run / "checkpoint")  # a manifest made to fit: still refused, by the weights' run stamp
    with pytest.raises(CheckpointError, match="model.safetensors belongs to run .* not to this checkpoint"):
        load_lm(run)
    (run / "checkpoint" / "manifest.json").unlink()  # no manifest: refused, the files carry stamps
    with pytest.warns(UserWarning, match="no manifest.json"), pytest.raises(CheckpointError,
                                                                           match="manifest.json is missing"):
        load_lm(run)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_payload(path: Path) -> None:
    import pickle

    class Payload:  # what an attacker would put in: an object whose unpickling runs code
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"state": Payload()}))


def _write(text: str):
    return lambda path: path.write_text(text)


EDITS = [
    ("rng.pt", _truncate, "rng.pt (the random number generator states) is truncated or corrupted"),
    ("rng.pt", _write(""), "rng.pt (the random number generator states) is truncated or corrupted"),
    ("rng.pt", lambda path: path.unlink(), "has no rng.pt"),
    ("optimizer.pt", _pickle_payload, "optimizer.pt holds objects other than tensors"),
    ("optimizer.pt", _truncate, "optimizer.pt (the optimizer state) is truncated or corrupted"),
    ("state.json", _write("{not json"), "state.json is corrupted (not JSON"),
    ("state.json", _write('{"data_fingerprint": "x"}'), 'state.json has no valid "step"'),
    # config.json is bound to the weights by its sha256 in their run stamp
    ("config.json", _write("[1, 2]"), "config.json is not the config the checkpoint's files were saved with"),
    ("config.json", None, "config.json is not the config the checkpoint's files were saved with"),
]


@pytest.mark.parametrize("name, edit, message", EDITS)
def test_edited_checkpoint_files_are_one_clear_error_naming_the_file(corpus, tmp_path, finished_run, capsys, name,
                                                                     edit, message):
    """Item 7: with the manifest made to fit the edit, each file still fails with what is wrong
    and what to do."""
    run = finished_run("run")
    path = run / "checkpoint" / name
    if edit is None:  # config values: a vocabulary of 10^12 tokens
        config = json.loads(path.read_text())
        config["model"]["vocab_size"] = 10**12
        path.write_text(json.dumps(config))
    else:
        edit(path)
    recompute_manifest(run / "checkpoint")
    # A resume reads every file; the model's size matters where it is built from config.json: eval.
    command = ["eval", "--checkpoint", str(run)] if edit is None else [
        "train", "--out", str(run), "--resume", "--train.max_steps=4"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(command)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert "pwned" not in out + err
    lines = [line for line in err.splitlines() if line and f"xmoe {command[0]}: warning: " not in line]
    assert len(lines) == 1, err
    assert f"xmoe {command[0]}: error:" in lines[0] and message in lines[0], lines[0]


# --- full disks and torn files ---------------------------------------------------------------


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Item 9: an injected ENOSPC in the middle of the optimizer state."""
    import errno

    from xmoe.training import CheckpointError, load_checkpoint, save_checkpoint
    from xmoe.models.gpt import GPT

    model = GPT(lm_run_config("debug-xmoe").model)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=1, config={})
    import xmoe.training.checkpoint as checkpoint_module

    class FullDisk:  # a file whose writes fail after 1000 bytes, as on a full disk
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return FullDisk(f) if Path(path).name == "optimizer.pt" else f

    monkeypatch.setattr(checkpoint_module, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(CheckpointError, match=r"no space left .*previous checkpoint .*checkpoint \(step 1\) is intact"):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=2, config={})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, model, optimizer)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_a_file_size_limit_during_a_resume_is_one_line_and_the_checkpoint_survives(tmp_path, finished_run, failing):
    """Item 9, for real: the kernel refuses the write (EFBIG under a file-size limit), inside
    safetensors' or torch's writer, in an `xmoe train --resume` subprocess."""
    import resource

    run = finished_run("run")
    before = load_lm(run).model.state_dict()
    sizes = {name: (run / "checkpoint" / name).stat().st_size for name in ("model.safetensors", "optimizer.pt")}
    limit = sizes[failing] // 2
    assert failing == "model.safetensors" or limit > sizes["model.safetensors"]

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "xmoe", "train", "--out", str(run), "--resume", "--train.max_steps=3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "no space left" in r.stderr
    assert "(step 2) is intact" in r.stderr
    assert saved_step(run) == 2
    after = load_lm(run).model.state_dict()  # the step-2 weights, untouched by the failed write
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not list(run.glob(".checkpoint-*"))


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, finished_run):
    """Item 8: what a full disk leaves at the end of metrics.jsonl."""
    from xmoe.report import write_report

    run = finished_run("run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')
    with pytest.warns(UserWarning, match="last line was cut short"):
        resume(run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [3, 4, 4]  # train 3, train 4, the final evaluation
    write_report(run)


# --- one clear line instead of a traceback ---------------------------------------------------


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `xmoe ARGV` in this process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines()
             if line.strip() and ": warning: " not in line
             and "step/s" not in line and "s/step" not in line]  # the progress bar (fast or slow steps)
    assert len(lines) == 1 and lines[0].startswith(f"xmoe {argv[0]}: error: "), err
    return lines[0]


def test_a_diverged_run_and_its_checkpoint_say_so_in_one_line(corpus, tmp_path, finished_run, capsys):
    """Item 10: lr 10^6 blows up within a few steps and training names the step; a checkpoint
    whose weights are finite but whose outputs are not (saved just before the blow-up: here,
    router weights of 3e38) says that its weights diverged, when evaluated."""
    from xmoe.training import read_config, save_checkpoint

    line = one_error_line(capsys, [*train_args(corpus, tmp_path / "diverged", tmp_path, steps=50), "--train.lr=1e6"])
    assert "the run diverged at step" in line and "lower train.lr" in line

    run = finished_run("run")
    model = load_lm(run).model
    with torch.no_grad():
        model.state_dict()["blocks.1.ffn.router.weight"].fill_(3e38)  # finite; x @ w is not
    save_checkpoint(run, model=model, step=2, config=read_config(run))
    line = one_error_line(capsys, ["eval", "--checkpoint", str(run)])
    assert "its weights diverged during training (checkpoint at step 2)" in line


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "x", "--steps", "10"], "did you mean 'train.max_steps' (--train.max_steps=VALUE)"),
    (["demo", "--steps", "0"], "--steps must be a positive number of training steps, got 0"),
])
def test_flags_that_do_not_exist_point_at_the_ones_that_do(tmp_path, capsys, monkeypatch, argv, message):
    """Item 14."""
    monkeypatch.chdir(tmp_path)
    assert message in one_error_line(capsys, argv)


def test_extending_a_finished_run_warns_that_the_schedule_moves_and_can_keep_it(tmp_path, finished_run):
    """Item 18: resume 2 -> 4 steps re-stretches the cosine; the warning says what the lr becomes,
    and --train.schedule_steps keeps the old schedule (lr at its floor, as a direct check)."""
    from xmoe.training import apply_overrides
    from xmoe.tasks.lm import LanguageModelling
    from xmoe.training.loop import lr_at
    from xmoe.training.runs import saved_config

    run = finished_run("run")
    saved = saved_config(run, LanguageModelling)
    longer = apply_overrides(saved, {"train.max_steps": "4"})
    with pytest.warns(UserWarning, match=r"now spans 4 steps instead of 2, so the learning rate at step 3 is "
                                         r".* add --train.schedule_steps=2"):
        train_lm(longer, run, resume=True, progress=False)
    # Hand-computed: warm-up round(0.1 * 2) -> 1 step; cosine from 3e-3 to 3e-5 over steps 1..2, then the floor.
    kept = apply_overrides(saved, {"train.max_steps": "4", "train.schedule_steps": "2"}).train
    assert [lr_at(s, kept) for s in range(4)] == pytest.approx([3e-3, 3e-3, 3e-5, 3e-5], rel=1e-12)
    other = finished_run("other")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old schedule: no warning
        train_lm(apply_overrides(saved, {"train.max_steps": "4", "train.schedule_steps": "2"}), other, resume=True,
                 progress=False)
    rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["split"] == "train" and r["step"] > 2] == pytest.approx([3e-5, 3e-5])


def test_sweep_and_eval_on_other_text_say_so_and_keep_the_runs_own_sweep(tmp_path, finished_run, capsys):
    """Item 19: a sweep on other text has its own files, which name the text and the step; eval
    says "loss on 'FILE'", not "validation loss". Item 23: summary.md shows the sweeps."""
    from xmoe.report import write_report

    run = finished_run("run")
    other = tmp_path / "other.txt"
    other.write_text("the lazy dog routes the quick tokens\n" * 40)
    cli_main(["sweep-threshold", "--checkpoint", str(run), "--thresholds", "0.5", "1.0", "--max-batches", "1"])
    cli_main(["sweep-threshold", "--checkpoint", str(run), "--thresholds", "0.7", "--max-batches", "1",
              "--data", str(other)])
    own = json.loads((run / "report" / "threshold_sweep.json").read_text())
    theirs = json.loads((run / "report" / "threshold_sweep_other.json").read_text())
    assert [r["threshold"] for r in own["rows"]] == [0.5, 1.0] and own["data"] == "the validation text"
    assert [r["threshold"] for r in theirs["rows"]] == [0.7] and theirs["data"] == repr(str(other))
    assert own["step"] == theirs["step"] == 2
    capsys.readouterr()
    cli_main(["eval", "--checkpoint", str(run), "--data", str(other), "--max-batches", "1"])
    assert capsys.readouterr().out.startswith(f"loss on {str(other)!r} ")
    summary = (write_report(run) / "summary.md").read_text()
    assert "## Threshold sweep (the validation text, checkpoint at step 2)" in summary
    assert f"## Threshold sweep ({str(other)!r}, checkpoint at step 2)" in summary


def test_a_dense_baseline_is_named_and_drawn_as_such(capsys):
    """Item 20: a model whose experts split a dense FFN (top_k = E) is compared with that FFN:
    axis, legend, a line at the dense model's perplexity (t = 1), neighbours' labels apart; and
    eval does not claim every expert was engaged."""
    from xmoe.presets import get_preset
    from xmoe.report import flops_baseline
    from xmoe.sweep import threshold_sweep_figure

    rows = [{"threshold": t, "perplexity": p, "moe_flops_ratio": r, "experts_per_token": e}
            for t, p, r, e in ((0.9, 31.0, 0.82, 6.6), (0.95, 30.2, 0.93, 7.4), (1.0, 30.0, 1.0, 8.0))]
    ax = threshold_sweep_figure(rows, baseline="dense", data="the validation text").axes[0]
    assert "dense FFN" in ax.get_xlabel() and "top-k" not in ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dense FFN's FLOPs (ratio 1)" in legend and "dense model (t = 1): 30.00" in legend
    offsets = [a.xyann[1] for a in ax.texts]  # t = 0.95 and t = 1 sit 0.07 apart in x
    assert offsets[1] != offsets[2]
    assert flops_baseline(get_preset("split8-debug").moe) == "the dense FFN's (all 8 experts' compute)"
    assert "top-k" in threshold_sweep_figure(rows, baseline="top-k", data="x").axes[0].get_xlabel()


def test_the_experts_plot_shows_what_training_wanted_as_well_as_kept(tmp_path, finished_run):
    """Item 23: training logs the experts the router wanted (before capacity) beside those kept."""
    from xmoe.report.plots import plot_experts_over_training
    from xmoe.training.metrics import read_rows, split_rows

    run = finished_run("run")
    train_rows, val_rows = split_rows(read_rows(run / "metrics.jsonl"))
    assert all(r["wanted_experts_per_token"] >= r["experts_per_token"] for r in train_rows)
    ax = plot_experts_over_training(train_rows, val_rows, tmp_path / "x.png").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train: kept (after capacity)", "train: wanted by the router (before capacity)",
        "validation: dropless, so kept = wanted"]


def test_the_progress_bar_redirected_to_a_file_does_not_flood_it():
    """Item 23: on a terminal the bar redraws every 0.1 s; into a log file, once a minute."""
    import io

    log = io.StringIO()  # not a terminal
    bar = loop_module._progress(0, 100, True, file=log)
    for _ in range(20):
        time.sleep(0.03)
        bar.update(1)
    bar.close()
    assert log.getvalue().count("\r") <= 3  # the first draw and the last, not one per 0.1 s


def test_every_command_takes_threads(capsys):
    """Item 22: --threads on every command (it was on `study` only)."""
    from xmoe.cli.main import build_parser

    def _leaf_parsers(commands: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
        """Every command's parser (`bench layer`, not `bench`)."""
        leaves = []
        for p in dict.fromkeys(commands.choices.values()):  # aliases map to the same parser
            nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
            leaves += _leaf_parsers(nested[0]) if nested else [p]
        return leaves

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    leaves = _leaf_parsers(commands)
    names = {p.prog.split(" ", 1)[1] for p in leaves}
    assert {"train", "eval", "translate", "train-mt", "eval-mt", "generate", "bench layer", "study", "demo"} <= names
    for p in leaves:
        assert any("--threads" in a.option_strings for a in p._actions), p.prog
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cli_main(["presets", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "--threads must be a positive integer, got 0" in one_error_line(capsys, ["presets", "--threads", "0"])


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path):
    """`xmoe presets | head -1`: the pipe closes before xmoe writes; exit 1, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "xmoe", "presets"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == ""
