"""`xmoe convert` and `xmoe sweep-threshold` on a Hugging Face model folder: a tiny GPT-2 and
a byte-level BPE tokenizer made here (nothing is downloaded), converted end to end."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.cli import run_cli as run  # noqa: E402
from helpers.data import write_corpus  # noqa: E402
from helpers.hf import WORDS, byte_level_tokenizer  # noqa: E402
from xmoe.cli.main import main  # noqa: E402
from xmoe.conversion.hf import ConvertedMLP, load_converted  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A GPT-2 folder as save_pretrained writes it, with its tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("hf")
    text = write_corpus(root / "text.txt", num_lines=300, words=WORDS, length=10)

    tokenizer = byte_level_tokenizer(text)
    cfg = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  n_inner=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = root / "gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, text, model


def test_convert_then_sweep_a_hugging_face_folder(hf_folder, tmp_path, capsys, monkeypatch):
    """The sweep's report goes to the current folder, never into the model's (issue 24 item 8)."""
    folder, text, dense = hf_folder
    out = tmp_path / "x4"
    printed = run(["convert", "--checkpoint", str(folder), "--experts", "4", "--out", str(out),
                   "--data", str(text), "--calibration-tokens", "512", "--device", "cpu"], capsys)
    assert "2 FFNs split into 4 experts" in printed and "sweep-threshold" in printed

    converted = load_converted(out)
    assert sum(isinstance(m, ConvertedMLP) for m in converted.modules()) == 2
    meta = json.loads((out / "xmoe_conversion.json").read_text())
    assert meta["calibration_tokens"] == 512 and len(meta["layers"]) == 2  # 8 windows of the 64-token context
    ids = torch.randint(len(WORDS), (2, 20))
    with torch.no_grad():  # t = 1: every expert, the dense model exactly
        torch.testing.assert_close(converted(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    table = run(["sweep-threshold", "--checkpoint", str(out), "--data", str(text), "--thresholds", "0.3", "1.0",
                 "--max-batches", "1", "--device", "cpu"], capsys)
    record = json.loads((here / "threshold_sweep_text.json").read_text())
    rows = record["rows"]
    assert [r["threshold"] for r in rows] == [0.3, 1.0] and record["data"] == repr(str(text))
    assert rows[1]["moe_flops_ratio"] == 1.0 and rows[0]["moe_flops_ratio"] < 1.0
    assert (here / "threshold_sweep_text.png").is_file() and "| 1 | 4.00 | 1.000 |" in table
    assert not (out / "report").exists()
    # At t = 1 the perplexity is the dense model's on the same text: 8 windows of 64 inputs and
    # their next tokens, spread evenly over the tokenized file (one document, then end-of-text).
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokens = tokenizer(text.read_text())["input_ids"] + [tokenizer.eos_token_id]
    starts = torch.linspace(0, len(tokens) - 65, 8, dtype=torch.float64).long()
    windows = torch.tensor([tokens[s:s + 65] for s in starts.tolist()])
    with torch.no_grad():
        logits = dense(input_ids=windows[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert rows[1]["perplexity"] == pytest.approx(torch.exp(ce).item(), rel=1e-4)


def test_hugging_face_errors_name_the_fix(hf_folder, tmp_path, capsys):
    folder, text, _ = hf_folder
    cases = [
        (["convert", "--checkpoint", str(folder), "--experts", "4", "--out", str(tmp_path / "a")], "--data FILE"),
        (["convert", "--checkpoint", str(folder), "--experts", "3", "--out", str(tmp_path / "b"), "--data", str(text)],
         "divide"),
        (["eval", "--checkpoint", str(folder)], "make it sparse first: xmoe convert"),
    ]
    bare = tmp_path / "no-tokenizer"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1,
                                                         n_head=2)).save_pretrained(bare)
    cases.append((["convert", "--checkpoint", str(bare), "--experts", "4", "--out", str(tmp_path / "c"),
                   "--data", str(text)], "tokenizer.save_pretrained"))
    converted = tmp_path / "converted"
    main(["convert", "--checkpoint", str(folder), "--experts", "2", "--out", str(converted), "--data", str(text),
          "--calibration-tokens", "128"])
    cases += [
        (["eval", "--checkpoint", str(converted)], "xmoe sweep-threshold --checkpoint"),
        (["sweep-threshold", "--checkpoint", str(converted)], "--data FILE"),
        (["convert", "--checkpoint", str(converted), "--experts", "2", "--out", str(tmp_path / "d"),
          "--data", str(text)], "already converted"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_bf16_llama_folder_stays_bf16_and_matches_at_t_1(hf_folder, tmp_path, capsys, monkeypatch):
    """Real LLaMA-style checkpoints are saved in bf16: the converted layers keep that dtype,
    and the loaded model runs (and equals the dense one at t = 1, to bf16 rounding)."""
    folder, text, _ = hf_folder
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(1)
    dense = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    llama = tmp_path / "llama-bf16"
    dense.save_pretrained(llama)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(llama)
    out = tmp_path / "llama-x4"
    run(["convert", "--checkpoint", str(llama), "--experts", "4", "--out", str(out), "--data", str(text),
         "--calibration-tokens", "256", "--device", "cpu"], capsys)
    converted = load_converted(out)
    mlps = [m for m in converted.modules() if isinstance(m, ConvertedMLP)]
    assert len(mlps) == 2 and all(p.dtype == torch.bfloat16 for m in mlps for p in m.parameters())
    assert mlps[0].moe.cfg.activation == "swiglu"
    ids = torch.randint(300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits.float(), dense(input_ids=ids).logits.float(),
                                   rtol=0.02, atol=0.02)
    monkeypatch.chdir(tmp_path)  # where the sweep writes its report
    table = run(["sweep-threshold", "--checkpoint", str(out), "--data", str(text), "--thresholds", "1.0",
                 "--max-batches", "1"], capsys)
    assert "| 1 | 4.00 | 1.000 |" in table
