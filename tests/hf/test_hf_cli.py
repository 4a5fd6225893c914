"""`xmoe export-hf` on each LM run kind (trained XMoE, split-FFN, a dense run converted by
`xmoe convert`), then the folder through transformers' Auto classes and xmoe's CLI; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.cli import TINY_TRAIN, run_cli
from helpers.data import write_corpus
from xmoe.cli.main import main
from xmoe.data import load_tokenizer
from xmoe.tasks.lm import load_lm



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_corpus(root / "corpus.txt", num_lines=400)
    cache = f"--data.cache_dir={root / 'cache'}"
    for preset in ("debug-xmoe", "split8-debug", "debug-dense"):
        main(["train", "--preset", preset, "--out", str(root / preset), f"--data.path={root / 'corpus.txt'}", *TINY_TRAIN, cache])
    main(["convert", "--checkpoint", str(root / "debug-dense"), "--experts", "8", "--out", str(root / "converted"),
          "--calibration-tokens", "512"])
    return root


@pytest.mark.parametrize("kind", ["debug-xmoe", "split8-debug", "converted"])
def test_export_loads_with_auto_classes_and_equals_the_run(runs, tmp_path, capsys, kind):
    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / kind), "--out", str(out)], capsys)
    loaded = load_lm(runs / kind)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "the lazy fox routes tokens"
    ids = tokenizer(text)["input_ids"]
    assert ids == load_tokenizer(runs / kind).encode(text)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded.model(x).logits_BLV, rtol=0, atol=1e-5)
    assert model.config.eos_token_id == tokenizer.eos_token_id == load_tokenizer(runs / kind).eot_id


def test_cli_on_the_export_matches_the_run(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the sweep writes its report
    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(out)], capsys)
    greedy = ["--prompt", "the quick", "--max-new-tokens", "12", "--temperature", "0"]
    from_run = run_cli(["generate", "--checkpoint", str(runs / "debug-xmoe"), *greedy], capsys)
    from_export = run_cli(["generate", "--checkpoint", str(out), *greedy], capsys)
    assert from_export == from_run
    text = str(runs / "corpus.txt")
    at_09 = json.loads(run_cli(["eval", "--checkpoint", str(out), "--data", text, "--max-batches", "1", "--json"], capsys))
    at_03 = json.loads(run_cli(["eval", "--checkpoint", str(out), "--data", text, "--max-batches", "1", "--json",
                                "--threshold", "0.3"], capsys))
    assert at_03["experts_per_token"] < at_09["experts_per_token"]
    assert sum(at_03["histogram"]) == at_03["tokens"] * 1  # one MoE layer: every token counted once
    table = run_cli(["sweep-threshold", "--checkpoint", str(out), "--data", text, "--max-batches", "1",
                     "--thresholds", "0.3", "0.9"], capsys)
    assert "| t=0.9 (as saved) |" in table and "| 0.3 |" in table and "tokens/s" in table


def test_bad_inputs_are_clear_and_an_existing_export_survives_a_failure(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(out)], capsys)
    before = sorted(p.name for p in out.iterdir())
    cases = [
        (["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(other)], "not an xmoe Hugging Face export"),
        (["export-hf", "--checkpoint", str(runs / "missing"), "--out", str(out)], "does not exist"),
        (["export-hf", "--checkpoint", "runs/missing", "--out", str(out)], "does not exist"),  # shaped like ORG/NAME
        (["export-hf", "--checkpoint", str(out), "--out", str(tmp_path / "again")], "already a Hugging Face model"),
        (["eval", "--checkpoint", str(out)], "--data"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in out.iterdir()) == before
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) is not None
    run_cli(["export-hf", "--checkpoint", str(runs / "split8-debug"), "--out", str(out)], capsys)  # replaces it
    assert json.loads((out / "config.json").read_text())["moe_every"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "other"]  # no temporary folder left behind


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),  # transformers sampled with it
    (["--top-k", "0"], "--top-k must be a positive integer, got 0"),  # transformers took 0 as no top-k
    (["--top-k", "-3"], "--top-k must be a positive integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),  # transformers: a traceback
    (["--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
])
def test_generate_refuses_a_bad_sampling_setting_alike_on_a_run_and_its_export(runs, tmp_path, capsys, flags,
                                                                             message):
    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(out)], capsys)
    for checkpoint in (runs / "debug-xmoe", out):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "--checkpoint", str(checkpoint), "--prompt", "the", *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "sweep-threshold"])
@pytest.mark.parametrize("count", ["0", "-1"])
def test_max_batches_below_one_is_refused_alike_on_a_run_and_its_export(runs, tmp_path, capsys, command, count):
    """On a folder 0 meant its default of 8 batches and -1 was a traceback; on a run the message
    named ValBatches.max_batches."""
    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(out)], capsys)
    report = ["--out", str(tmp_path / "sweep")] if command == "sweep-threshold" else []
    for checkpoint in (runs / "debug-xmoe", out):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--checkpoint", str(checkpoint), "--data", str(runs / "corpus.txt"), "--max-batches",
                  count, *report])
        assert exit_.value.code == 2
        assert f"--max-batches must be a positive number of batches, got {count}" in capsys.readouterr().err


def test_sweep_thresholds_are_checked_before_any_point(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(out)], capsys)
    for checkpoint in (runs / "debug-xmoe", out):
        with pytest.raises(SystemExit) as exit_:
            main(["sweep-threshold", "--checkpoint", str(checkpoint), "--data", str(runs / "corpus.txt"),
                  "--thresholds", "0.5", "0", "--out", str(tmp_path / "sweep")])
        assert exit_.value.code == 2 and "--thresholds 0: threshold must be a number > 0" in capsys.readouterr().err
        assert not (tmp_path / "sweep").exists()  # no point measured before the refusal


def test_a_failure_while_writing_keeps_the_earlier_export(runs, tmp_path, capsys, monkeypatch):
    from xmoe.hf import XMoEForCausalLM

    out = tmp_path / "hf"
    run_cli(["export-hf", "--checkpoint", str(runs / "debug-xmoe"), "--out", str(out)], capsys)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_written(self, folder, **kwargs):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(XMoEForCausalLM, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        main(["export-hf", "--checkpoint", str(runs / "split8-debug"), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_run_that_evaluates_with_capacity_exports_only_with_dropless(runs, tmp_path, capsys):
    run = tmp_path / "capped"
    main(["train", "--preset", "debug-xmoe", "--out", str(run), f"--data.path={runs / 'corpus.txt'}", *TINY_TRAIN,
          f"--data.cache_dir={runs / 'cache'}", "--model.moe.eval_capacity_factor=1.0"])
    out = tmp_path / "hf"
    with pytest.raises(SystemExit):
        main(["export-hf", "--checkpoint", str(run), "--out", str(out)])
    assert "--dropless" in capsys.readouterr().err and not out.exists()
    run_cli(["export-hf", "--checkpoint", str(run), "--out", str(out), "--dropless"], capsys)
    assert json.loads((out / "config.json").read_text())["moe"]["eval_capacity_factor"] is None
