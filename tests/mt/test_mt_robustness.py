"""Translation runs meeting bad input: empty or non-UTF-8 files, invalid UTF-8 on stdin, the
wrong kind of checkpoint, and the report of a translation run."""

from __future__ import annotations

import io
import json

import pytest
import torch

from helpers.mt import write_toy_corpus
from xmoe.cli.main import main
from xmoe.data import DataConfig
from xmoe.training import TrainConfig
from xmoe.tasks.lm import lm_run_config, train_lm
from xmoe.tasks.mt import mt_run_config, train_mt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny finished translation run and a tiny finished language-model run."""
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    (src, tgt), (vsrc, vtgt) = write_toy_corpus(root / "train", 300, seed=0), write_toy_corpus(root / "valid", 20, seed=1)
    cfg = mt_run_config("debug-xmoe-16x64", overrides={
        "data.src": src, "data.tgt": tgt, "data.valid_src": vsrc, "data.valid_tgt": vtgt, "data.vocab_size": "60",
        "data.max_tokens": "256", "train.max_steps": "4", "train.eval_every": "2", "train.log_every": "1",
        "train.device": "cpu", "eval_bleu_sentences": "5", "decode.beam": "1"})
    train_mt(cfg, root / "mt", progress=False)
    (root / "lm.txt").write_text("\n".join(open(src).read().splitlines() * 3))
    lm = lm_run_config("debug-xmoe", data=DataConfig(path=str(root / "lm.txt"), vocab_size=300,
                                                     cache_dir=str(root / "cache")),
                       train=TrainConfig(max_steps=2, batch_size=4, seq_len=32, eval_batches=2))
    train_lm(lm, root / "lm", progress=False)
    return {"mt": root / "mt", "lm": root / "lm", "valid": (vsrc, vtgt), "root": root}


def one_error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "step/s" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"xmoe {argv[0]}: error: "), err
    return lines[0]


def test_train_mt_without_its_files_names_the_flags_that_give_them(tmp_path, capsys):
    """It named --src and --tgt, which `xmoe train-mt` does not take."""
    line = one_error_line(capsys, ["train-mt", "--preset", "debug-xmoe-16x64", "--out", str(tmp_path / "run")])
    assert "(--data.src=FILE --data.tgt=FILE)" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "blank.txt").write_text("\n" * 300)
    blank = str(tmp_path / "blank.txt")
    line = one_error_line(capsys, ["train-mt", "--preset", "debug-xmoe-16x64", "--out", str(tmp_path / "run"),
                                   f"--data.src={blank}", f"--data.tgt={blank}"])
    assert "check that --data.src and --data.tgt are the training files" in line


def test_eval_mt_writes_hypotheses_into_a_new_folder_and_refuses_a_folder_as_the_file(runs, tmp_path, capsys):
    """--hyp-out in a folder that did not exist failed after the decoding, losing the scores."""
    vsrc, vtgt = runs["valid"]
    argv = ["eval-mt", "--checkpoint", str(runs["mt"]), "--src", vsrc, "--ref", vtgt, "--json"]
    main([*argv, "--hyp-out", str(tmp_path / "new" / "hyp.txt")])
    assert "bleu" in json.loads(capsys.readouterr().out)
    assert len((tmp_path / "new" / "hyp.txt").read_text().splitlines()) == len(open(vsrc).read().splitlines())
    line = one_error_line(capsys, [*argv, "--hyp-out", str(tmp_path)])
    assert f"--hyp-out {tmp_path} is a folder" in line


@pytest.mark.parametrize("command", [["eval"], ["sweep-threshold"], ["generate", "--prompt", "sun"]])
def test_lm_commands_on_a_translation_run_say_which_command_to_use(runs, capsys, command):
    """Item 13: not "unknown config keys for LMRunConfig: decode, ..."."""
    line = one_error_line(capsys, [command[0], "--checkpoint", str(runs["mt"]), *command[1:]])
    assert "is a translation run (xmoe train-mt): use xmoe translate or eval-mt" in line


def test_translation_commands_on_a_language_model_run_say_which_command_to_use(runs, capsys):
    vsrc, vtgt = runs["valid"]
    for argv in (["translate"], ["eval-mt", "--src", vsrc, "--ref", vtgt]):
        line = one_error_line(capsys, [argv[0], "--checkpoint", str(runs["lm"]), *argv[1:]])
        assert "is a language-model run (xmoe train): use xmoe eval" in line
    line = one_error_line(capsys, ["train-mt", "--out", str(runs["lm"]), "--resume"])
    assert "is a language-model run" in line


def test_invalid_utf8_on_translate_stdin_names_the_line(runs, capsys, monkeypatch):
    """Item 12: not "TypeError: List elements must be str or bytes"."""
    stdin = io.TextIOWrapper(io.BytesIO(b"sun moon\nbird \xff fish\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    line = one_error_line(capsys, ["translate", "--checkpoint", str(runs["mt"])])
    assert "stdin, line 2: not valid UTF-8 (byte 0xff at column 6)" in line


def test_bad_training_files_are_named(runs, tmp_path, capsys):
    """Item 12: all-empty files never reach sentencepiece; invalid UTF-8 names the file and line."""
    empty_src, empty_tgt = tmp_path / "e.src", tmp_path / "e.tgt"
    empty_src.write_text("\n" * 50)
    empty_tgt.write_text("\n" * 50)
    vsrc, vtgt = runs["valid"]
    common = [f"--data.valid_src={vsrc}", f"--data.valid_tgt={vtgt}", "--data.vocab_size=60", "--train.max_steps=1"]
    line = one_error_line(capsys, ["train-mt", "--preset", "debug-xmoe-16x64", f"--data.src={empty_src}",
                                   f"--data.tgt={empty_tgt}", "--out", str(tmp_path / "a"), *common])
    assert f"{empty_src} has 50 lines and all are empty" in line
    latin1 = tmp_path / "l.src"
    latin1.write_bytes("sun\nmoon\nFrançois\n".encode("latin-1"))
    line = one_error_line(capsys, ["train-mt", "--preset", "debug-xmoe-16x64", f"--data.src={latin1}",
                                   f"--data.tgt={latin1}", "--out", str(tmp_path / "b"), *common])
    assert f"{latin1}, line 3: not valid UTF-8" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # failed starts leave nothing


def test_report_of_a_translation_run(runs, tmp_path):
    """Item 17: `xmoe report MT_RUN` used to fail with KeyError: 'perplexity'."""
    main(["report", str(runs["mt"]), "--out", str(tmp_path / "report")])
    summary = (tmp_path / "report" / "summary.md").read_text()
    rows = [json.loads(line) for line in (runs["mt"] / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["split"] == "val"][-1]
    assert f"{final['bleu']:.2f}" in summary and f"{final['chrf']:.2f}" in summary
    assert (tmp_path / "report" / "loss.png").is_file()
