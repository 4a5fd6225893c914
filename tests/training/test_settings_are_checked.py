"""Settings a user can get wrong: each is refused as one line (exit status 2) naming the setting
and the fix, or takes effect; none is silently replaced or ignored (issue 23, items 5, 6, 9, 14)."""

from __future__ import annotations

import pytest

from helpers.cli import TINY_TRAIN
from helpers.data import write_corpus
from xmoe.cli.main import main as cli_main
from xmoe.training import apply_overrides, lm_run_config, train_lm


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
