"""`xmoe sweep-threshold / eval / generate` on a pretrained-MoE folder (a tiny OLMoE and its
tokenizer, saved here), and the error for a folder holding an unsupported MoE."""

from __future__ import annotations

import json
import os

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
    assert "| top-2 (the model's own) |" in table and "| 0.3 |" in table and "| 0.9 |" in table
    points = json.loads((tmp_path / "threshold_sweep_text.json").read_text())["rows"]
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


def test_generate_on_an_olmoe_folder_reports_the_experts_its_tokens_got(olmoe_folder, capsys):
    """At the model's own routing every token of every MoE block gets its top-k (the config's
    num_experts_per_tok); with the threshold dial at t = 1 and a cap of 1 expert, exactly one."""
    from transformers import AutoConfig

    folder, _ = olmoe_folder
    config = AutoConfig.from_pretrained(folder)
    greedy = ["generate", "--checkpoint", str(folder), "--prompt", "the quick", "--max-new-tokens", "3",
              "--temperature", "0"]
    for extra, experts in (([], config.num_experts_per_tok), (["--threshold", "1.0", "--max-experts", "1"], 1)):
        main(greedy + extra)
        err = capsys.readouterr().err
        layers = config.num_hidden_layers
        assert f"{experts:.2f} experts per token (mean over {layers} MoE layer{'s' if layers > 1 else ''})" in err


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


@pytest.mark.parametrize("kind", ["a Hugging Face MoE model", "a converted Hugging Face model"])
def test_folder_commands_need_text_and_take_no_capacity(kind) -> None:
    """eval / sweep-threshold on either kind of Hugging Face folder: one clear line each."""
    from xmoe.cli.hf import check_folder_args

    with pytest.raises(ValueError, match=f"is {kind}, which brings no evaluation text: give held-out text with --data"):
        check_folder_args("m", None, False, kind)
    with pytest.raises(ValueError, match=f"--capacity: {kind} is evaluated dropless"):
        check_folder_args("m", "t.txt", True, kind)
    check_folder_args("m", "t.txt", False, kind)


@pytest.mark.parametrize("command", ["eval", "sweep-threshold"])
def test_a_hub_id_without_text_is_called_a_hub_id(command, tmp_path, capsys, monkeypatch) -> None:
    """ORG/NAME that is no local folder is named a Hub id (not a folder) when --data is missing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main([command, "--checkpoint", "org/some-moe"])
    assert "org/some-moe is a Hugging Face Hub id, which brings no evaluation text" in capsys.readouterr().err


def test_a_hub_id_is_handed_to_transformers(olmoe_folder, tmp_path, capsys, monkeypatch):
    """Issue 24 item 8: ORG/NAME that is no local folder reaches transformers' from_pretrained
    (nothing can be downloaded here, so the Hub is this test's OLMoE folder), not a "train one"
    refusal; an id transformers cannot load is one clear line naming the Hub."""
    import transformers

    folder, text = olmoe_folder
    monkeypatch.chdir(tmp_path)
    asked = []

    def from_hub(original):
        def load(name, *args, **kwargs):
            asked.append((str(name), kwargs.get("local_files_only")))
            if str(name) == "org/tiny-olmoe":
                return original(folder, *args, **kwargs)
            if os.path.isdir(name):
                return original(name, *args, **kwargs)
            raise OSError(f"{name} is not a local folder and is not a valid model identifier")
        return load

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", from_hub(cls.from_pretrained))
    local = json.loads(run(["eval", "--checkpoint", str(folder), "--data", str(text), "--max-batches", "1",
                            "--json"], capsys))
    asked.clear()
    hub = json.loads(run(["eval", "--checkpoint", "org/tiny-olmoe", "--data", str(text), "--max-batches", "1",
                          "--json"], capsys))
    assert hub["perplexity"] == pytest.approx(local["perplexity"], rel=1e-6)
    assert ("org/tiny-olmoe", False) in asked  # the model, from the Hub, not local files only
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", "org/no-such-model", "--prompt", "the"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "taken for a Hugging Face Hub id" in err and "org/no-such-model" in err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "no-such-run", "--data", str(text)])
    assert "no checkpoint at no-such-run: the folder does not exist" in capsys.readouterr().err
