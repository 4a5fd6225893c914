"""`xmoe sweep-threshold / eval / generate` on a pretrained-MoE folder (a tiny OLMoE and its
tokenizer, saved here), and the error for a folder holding an unsupported MoE."""

from __future__ import annotations

import json

import pytest

from helpers.cli import run_cli as run
from helpers.data import write_corpus
from helpers.hf import WORDS, byte_level_tokenizer, tiny_family
from xmoe.cli.main import main


@pytest.fixture(scope="module")
def olmoe_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmoe")
    text = write_corpus(root / "text.txt", num_lines=300, words=WORDS, length=10)
    tokenizer = byte_level_tokenizer(text)
    model = tiny_family("olmoe", vocab_size=len(tokenizer))
    folder = root / "olmoe"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, text


def test_sweep_eval_and_generate_on_an_olmoe_folder(olmoe_folder, tmp_path, capsys):
    folder, text = olmoe_folder
    table = run(["sweep-threshold", "--checkpoint", str(folder), "--data", str(text), "--max-batches", "1",
                 "--thresholds", "0.3", "0.9", "--out", str(tmp_path)], capsys)
    assert "| top-2 (the model's own) |" in table and "| t=0.3 |" in table and "| t=0.9 |" in table
    points = json.loads((tmp_path / "threshold_sweep.json").read_text())
    own, low, high = points
    assert own["experts_per_token"] == 2.0 and low["experts_per_token"] < high["experts_per_token"]
    assert all(p["tokens_per_second"] > 0 and p["tokens"] == own["tokens"] for p in points)
    capped = json.loads(run(["eval", "--checkpoint", str(folder), "--data", str(text), "--max-batches", "1",
                             "--threshold", "1.0", "--max-experts", "2", "--json"], capsys))
    assert capped["perplexity"] == pytest.approx(own["perplexity"], rel=1e-5)  # the top-k setting: the same model
    greedy = ["--prompt", "the quick", "--max-new-tokens", "6", "--temperature", "0"]
    assert run(["generate", "--checkpoint", str(folder), *greedy, "--threshold", "0.5"], capsys).startswith("the quick")
    sampled = ["--prompt", "the quick", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3"]
    first, second = (run(["generate", "--checkpoint", str(folder), *sampled], capsys) for _ in range(2))
    assert first == second and first.startswith("the quick")  # seeded


def test_a_folder_with_an_unsupported_moe_is_named(tmp_path, capsys):
    folder = tmp_path / "granite"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "granitemoe", "num_local_experts": 8}))
    for argv in (["eval", "--checkpoint", str(folder), "--data", "x.txt"],
                 ["sweep-threshold", "--checkpoint", str(folder), "--data", "x.txt"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert "'granitemoe'" in err and "olmoe, flex_olmo, qwen2_moe, qwen3_moe" in err


@pytest.mark.parametrize("kind", ["a Hugging Face model folder", "a converted Hugging Face model"])
def test_folder_commands_need_text_and_take_no_capacity(kind) -> None:
    """eval / sweep-threshold on either kind of Hugging Face folder: one clear line each."""
    import argparse

    from xmoe.cli.hf import check_folder_args

    with pytest.raises(ValueError, match=f"is {kind}, which brings no evaluation text: give held-out text with --data"):
        check_folder_args(argparse.Namespace(checkpoint="m", data=None, capacity=False), kind)
    with pytest.raises(ValueError, match=f"--capacity: {kind} is evaluated dropless"):
        check_folder_args(argparse.Namespace(checkpoint="m", data="t.txt", capacity=True), kind)
    check_folder_args(argparse.Namespace(checkpoint="m", data="t.txt", capacity=False), kind)
