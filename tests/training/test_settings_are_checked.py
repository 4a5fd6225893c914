"""Settings a user can get wrong: each is refused as one line (exit status 2) naming the setting
and the fix, or takes effect; none is silently replaced or ignored (issue 23, items 5, 6, 9, 14)."""

from __future__ import annotations

import pytest

from helpers.cli import TINY_TRAIN
from helpers.data import write_corpus
from xmoe.cli.main import main as cli_main
from xmoe.training import apply_overrides
from xmoe.tasks.lm import lm_run_config, train_lm


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (2 steps)."""
    root = tmp_path_factory.mktemp("settings")
    corpus = write_corpus(root / "corpus.txt")
    cfg = lm_run_config("debug-xmoe", overrides={"data.path": str(corpus), "data.vocab_size": "300",
                                                 "data.cache_dir": str(root / "cache"), "train.max_steps": "2",
                                                 "train.batch_size": "4", "train.seq_len": "32",
                                                 "train.eval_batches": "1"})
    train_lm(cfg, root / "run", progress=False)
    return root / "run"


def one_line_error(argv: list[str], capsys) -> str:
    """The single error line ``xmoe ARGV`` ends with (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("xmoe ") and ": warning: " not in line]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# item 5: the model's vocabulary is the tokenizer's; a flag that would be replaced is refused


def test_a_model_vocab_size_flag_is_refused_naming_data_vocab_size(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    line = one_line_error(["train", "--preset", "debug-xmoe", "--out", str(tmp_path / "run"), f"--data.path={corpus}",
                           f"--data.cache_dir={tmp_path / 'cache'}", *TINY_TRAIN, "--model.vocab_size=10"], capsys)
    assert "--model.vocab_size: a run's vocabulary is its tokenizer's" in line
    assert "--data.vocab_size=10" in line
    assert not (tmp_path / "run").exists()


# item 6: --max-experts is refused where nothing would read it


@pytest.mark.parametrize("argv", [["generate", "--prompt", "the", "--max-experts", "0"],
                                  ["eval", "--max-experts", "-1"],
                                  ["sweep-threshold", "--thresholds", "0.5", "--max-experts", "2"]])
def test_max_experts_on_an_xmoe_run_is_refused(run, capsys, argv):
    line = one_line_error([argv[0], "--checkpoint", str(run), *argv[1:]], capsys)
    assert "--max-experts applies to Hugging Face MoE folders" in line and "drop --max-experts" in line


# item 9: a bad setting is a usage error, not a traceback from deep inside


def test_betas_outside_zero_one_are_refused_by_the_config(tmp_path, capsys):
    line = one_line_error(["train", "--out", str(tmp_path / "run"), "--train.betas=[2, 3]"], capsys)
    assert "train.betas must be two numbers in [0, 1)" in line and "got [2.0, 3.0]" in line


def test_a_backend_that_cannot_run_here_is_a_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton backend can run")
    corpus = write_corpus(tmp_path / "corpus.txt")
    line = one_line_error(["train", "--preset", "debug-xmoe", "--out", str(tmp_path / "run"),
                           f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}",
                           "--model.moe.backend=triton", "--train.device=cpu", *TINY_TRAIN], capsys)
    assert "model.moe.backend='triton' cannot run here" in line
    assert not (tmp_path / "run").exists()  # the failed start left nothing behind


# item 14: values are JSON, so a JSON string is a string


@pytest.mark.parametrize("key, value, field", [("train.precision", '"bf16"', "bf16"),
                                               ("train.device", '"cpu"', "cpu"),
                                               ("model.moe.backend", '"loop"', "loop")])
def test_json_quoted_strings_lose_their_quotes(key, value, field):
    cfg = apply_overrides(lm_run_config("debug-xmoe"), {key: value})
    section, _, name = key.rpartition(".")
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    assert getattr(obj, name) == field


def test_a_plain_string_with_quotes_inside_is_kept():
    cfg = apply_overrides(lm_run_config("debug-xmoe"), {"data.path": 'my "quoted" file.txt'})
    assert cfg.data.path == 'my "quoted" file.txt'


# items 10, 12, 13: paths, failed starts and full disks


@pytest.mark.parametrize("out", ["file.txt/sub", "file.txt"])
def test_an_out_path_through_a_file_is_one_line(tmp_path, capsys, out):
    (tmp_path / "file.txt").write_text("keep me")
    line = one_line_error(["train", "--out", str(tmp_path / out), "--preset", "debug-xmoe"], capsys)
    assert f"--out {tmp_path / out}: a file stands where a folder must be" in line
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_a_metrics_log_that_is_a_folder_is_one_line_on_resume(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "metrics.jsonl").unlink()
    (copy / "metrics.jsonl").mkdir()
    before = (copy / "checkpoint" / "manifest.json").read_text()
    line = one_line_error(["train", "--out", str(copy), "--resume", "--train.max_steps=3"], capsys)
    assert "metrics.jsonl is a folder, not the run's metrics log" in line
    assert (copy / "checkpoint" / "manifest.json").read_text() == before


def test_a_lock_that_cannot_be_written_is_undone_with_the_failed_start(tmp_path, monkeypatch):
    import errno
    import os

    from xmoe.training.runs import run_folder

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        with run_folder(tmp_path / "new", resume=False):
            pass
    assert not (tmp_path / "new").exists()


def test_a_huge_vocab_size_is_bounded_by_the_text():
    from xmoe.data import BPETokenizer

    tokenizer = BPETokenizer.train(["a tiny text, a tiny text"], vocab_size=1_000_000_000)
    assert 257 <= tokenizer.vocab_size <= 257 + len("a tiny text, a tiny text")


def test_a_first_save_on_a_full_disk_does_not_advise_a_resume(tmp_path, monkeypatch):
    """Item 13: no earlier checkpoint, and the failed start removes the folder: start again."""
    import errno

    from xmoe.models.gpt import GPT
    from xmoe.training import CheckpointError, save_checkpoint
    from xmoe.training import checkpoint as checkpoint_module

    def full(obj, path):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(checkpoint_module, "_torch_save", full)
    model = GPT(lm_run_config("debug-xmoe").model)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(tmp_path, model=model, step=1, config={})
    assert "nothing to resume: free some space, then start the run again" in str(error.value)
    assert "--resume" not in str(error.value)


def test_an_export_onto_a_full_disk_is_one_error_and_keeps_the_earlier_export(tmp_path):
    """Item 11: safetensors reports a full disk as a SafetensorError quoting the OS error."""
    import errno
    import json

    pytest.importorskip("transformers")
    from safetensors import SafetensorError

    from xmoe.hf import export as export_module

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "xmoe"}))

    class FullDisk:
        def save_pretrained(self, folder):
            (folder / "model.safetensors").write_bytes(b"partial")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" }) (os error 28)")

    with pytest.raises(OSError) as error:
        export_module._write(out, FullDisk(), None, card="")
    assert error.value.errno == errno.ENOSPC
    assert f"the earlier export in {out} is intact" in str(error.value)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "xmoe"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no half-written export left beside it


@pytest.mark.parametrize("task", ["lm", "mt"])
def test_a_model_larger_than_the_memory_is_refused_for_either_task(task, monkeypatch) -> None:
    """Both tasks count a model's parameters from its config before building it; fp32 weights
    that exceed the machine's memory are refused, one byte less than they need is enough."""
    from xmoe.errors import UsageError
    from xmoe.tasks.lm import LanguageModelling
    from xmoe.tasks.mt import Translation, mt_run_config
    from xmoe.training import runs

    Task, cfg = ((LanguageModelling, lm_run_config("debug-xmoe")) if task == "lm"
                 else (Translation, mt_run_config("debug-xmoe-16x64")))
    params = sum(p.numel() for p in Task.build_model(cfg.model).parameters())  # counted on a built model
    for memory, refused in ((4 * params, False), (4 * params - 1, True)):
        monkeypatch.setattr(runs.os, "sysconf", lambda name: memory if name == "SC_PHYS_PAGES" else 1)
        if refused:
            with pytest.raises(UsageError, match=f"would have {params:,} parameters"):
                runs.check_fits_in_memory(Task.num_params(cfg.model), "the preset")
        else:
            runs.check_fits_in_memory(Task.num_params(cfg.model), "the preset")
