"""Hugging Face GPT-2 and LLaMA, tiny and randomly initialised here (nothing is downloaded):
converted models equal the originals at t >= 1, through a local folder and back."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from xmoe.conversion import ConversionConfig, RouterFitConfig  # noqa: E402
from xmoe.sweep import hf_logits, measure_layers, threshold_dial  # noqa: E402
from xmoe.conversion.hf import (  # noqa: E402
    ConvertedMLP, convert_hf, convert_hf_checkpoint, load_converted, save_converted,
)

FAST = RouterFitConfig(steps=30)


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_()
            block.mlp.c_proj.bias.normal_(std=0.1)
    return model


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("build,activation", [(tiny_gpt2, "gelu_tanh"), (tiny_llama, "swiglu")])
@pytest.mark.parametrize("partition", ["contiguous", "clustered"])
def test_converted_hf_model_equals_the_original_at_t_1(build, activation, partition):
    model = build()
    x = torch.randint(64, (2, 12))
    with torch.no_grad():
        reference = model(input_ids=x).logits
    reports = convert_hf(model, torch.randint(64, (4, 16)), ConversionConfig(num_experts=4, partition=partition,
                                                                             router=FAST))
    converted = [m for m in model.modules() if isinstance(m, ConvertedMLP)]
    assert len(reports) == len(converted) == 2
    assert converted[0].moe.cfg.activation == activation
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference, rtol=1e-5, atol=1e-5)
    for t, full in ((1.0, True), (0.3, False)):
        threshold_dial(model)(t)
        assert (measure_layers(model, [(x, x)], hf_logits).moe_flops_ratio == 1.0) == full


def test_hf_folder_in_converted_folder_out(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    x = torch.randint(64, (1, 10))
    with torch.no_grad():
        reference = model(input_ids=x).logits
    converted = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True)
    convert_hf(converted, torch.randint(64, (2, 16)), ConversionConfig(num_experts=2, router=FAST))
    save_converted(converted, tmp_path / "sparse")
    with pytest.raises(ValueError, match="already exists"):
        save_converted(converted, tmp_path / "sparse")
    reloaded = load_converted(tmp_path / "sparse")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a folder"):
        convert_hf_checkpoint(tmp_path / "missing", tmp_path / "out", ConversionConfig(num_experts=2), data="text.txt")
