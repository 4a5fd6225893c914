"""`xmoe export-hf` on Hugging Face GPT-2 and LLaMA models converted by `xmoe convert`: the export
is an ordinary folder that AutoModelForCausalLM loads (trust_remote_code), with the converted
model's logits and greedy generations, and the threshold dial."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from helpers.data import write_corpus
from helpers.hf import WORDS, byte_level_tokenizer
from xmoe.cli.main import main
from xmoe.conversion import ConversionConfig, RouterFitConfig
from xmoe.conversion.hf import convert_hf, load_converted, save_converted
from xmoe.hf import XMoEConvertedForCausalLM
from xmoe.moe import MoELayer, set_threshold


def tokenizer(root):
    return byte_level_tokenizer(write_corpus(root / "text.txt", num_lines=200, words=WORDS, length=10))


def gpt2(vocab):
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2, n_head=2,
                                            n_inner=64)).eval()


def llama(vocab):
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=48)).eval()


@pytest.mark.parametrize("build", [gpt2, llama])
def test_a_converted_hugging_face_model_exports_to_an_ordinary_folder(build, tmp_path, capsys):
    tok = tokenizer(tmp_path)
    model = build(len(tok))
    convert_hf(model, torch.randint(len(tok), (4, 16)), ConversionConfig(num_experts=4, threshold=0.8,
                                                                         router=RouterFitConfig(steps=20)))
    save_converted(model, tmp_path / "converted", tokenizer=tok)
    main(["export-hf", "--checkpoint", str(tmp_path / "converted"), "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    reference = load_converted(tmp_path / "converted")
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(exported).__name__ == "XMoEConvertedForCausalLM" and exported.config.moe_threshold == 0.8
    assert len([m for m in exported.modules() if isinstance(m, MoELayer)]) == 2
    x = torch.tensor([tf.AutoTokenizer.from_pretrained(tmp_path / "hf")("the lazy fox routes")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, reference(x).logits, rtol=0, atol=1e-5)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(exported.generate(x, **greedy), reference.generate(x, **greedy))
    evals = {}
    for t in ("0.3", "1.0"):
        main(["eval", "--checkpoint", str(tmp_path / "hf"), "--data", str(tmp_path / "text.txt"), "--max-batches", "1",
              "--threshold", t, "--json"])
        evals[t] = json.loads(capsys.readouterr().out)
    assert evals["0.3"]["experts_per_token"] < evals["1.0"]["experts_per_token"] == 4.0
    # as saved (no --threshold): an AttributeError (no moe_layers) before
    main(["eval", "--checkpoint", str(tmp_path / "hf"), "--data", str(tmp_path / "text.txt"), "--max-batches", "1",
          "--json"])
    assert json.loads(capsys.readouterr().out)["routing"] == "t=0.8 (as saved)"
    set_threshold(exported, 0.4)
    set_threshold(reference, 0.4)
    exported.save_pretrained(tmp_path / "hf04")
    again = XMoEConvertedForCausalLM.from_pretrained(tmp_path / "hf04").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, reference(x).logits, rtol=0, atol=1e-5)


def test_checkpoint_kind_knows_every_exported_model_type() -> None:
    """checkpoint_kind names the model types of export-hf folders without importing transformers."""
    from xmoe.checkpoint_kind import XMOE_MODEL_TYPES
    from xmoe.hf import XMoEConfig, XMoEConvertedConfig

    assert sorted(XMOE_MODEL_TYPES) == sorted({XMoEConfig.model_type, XMoEConvertedConfig.model_type})
