"""A LoRA adapter from peft trains on an xmoe model loaded through transformers (attention
projections), and reloads onto a fresh copy of the base model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

peft = pytest.importorskip("peft")

from helpers.hf import VOCAB, hf_from_gpt, tiny_gpt  # noqa: E402


def test_lora_on_attention_trains_and_reloads(tmp_path):
    hf_from_gpt(tiny_gpt()).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj"],
                                                      task_type="CAUSAL_LM"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert sum("attn.qkv" in n for n in trainable) == sum("attn.proj" in n for n in trainable) == 2 * 4  # A, B x 4 layers
    x = torch.randint(VOCAB, (4, 24))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:  # the base weights did not move
            torch.testing.assert_close(p, frozen[name.replace(".base_layer", "")], rtol=0, atol=0)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                              tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)
