"""A LoRA adapter from peft trains on an xmoe model loaded through transformers (attention
projections), and reloads onto a fresh copy of the base model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

peft = pytest.importorskip("peft")

from helpers.hf import VOCAB, hf_from_gpt, tiny_gpt  # noqa: E402



def train_lora(model, x: torch.Tensor, steps: int = 15) -> list[float]:
    """AdamW on the trainable (LoRA) parameters over the batch ``x``; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses

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
    losses = train_lora(model, x)
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


def _reference_moe(h_TD, router_DE, w1, b1, w2, b2, t: float) -> torch.Tensor:
    """The XMoE layer in float64, one token at a time: the experts in order of probability until
    the mass before the next one reaches t; each weighted by its probability."""
    h_TD = h_TD.double()
    p_TE = (h_TD @ router_DE.double().T).softmax(-1)
    y_TD = torch.zeros_like(h_TD)
    for i in range(h_TD.shape[0]):
        mass = 0.0
        for e in p_TE[i].argsort(descending=True).tolist():
            if mass >= t:
                break
            ffn = torch.nn.functional.gelu(h_TD[i] @ w1[e].double() + b1[e].double()) @ w2[e].double() + b2[e].double()
            y_TD[i] += p_TE[i, e] * ffn
            mass += p_TE[i, e].item()
    return y_TD


@pytest.mark.parametrize("portable", [False, True], ids=["xmoe", "portable"])
def test_lora_on_the_experts_trains_merges_and_equals_the_merged_weights(portable):
    """PEFT's target_parameters (LoRA on the 3-D expert weights) on xmoe's model and on the
    portable one an exported folder carries."""
    from helpers.hf import portable_copy

    base = hf_from_gpt(tiny_gpt())
    base = portable_copy(base) if portable else base
    frozen = {name: p.detach().clone() for name, p in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                      target_parameters=["experts.w1", "experts.w2"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all("lora_" in name for name in trainable)  # 2 layers x (w1, w2) x (A, B)
    x = torch.randint(VOCAB, (4, 24))
    losses = train_lora(model, x)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    ffn = model.get_base_model().transformer.blocks[3].ffn
    seen = {}
    hook = ffn.register_forward_hook(
        lambda _m, inputs, out: seen.update(h=inputs[0], y=out[0] if isinstance(out, tuple) else out.output))
    with torch.no_grad():
        lora_logits = model(input_ids=x).logits
    hook.remove()
    merged = model.merge_and_unload()
    weights = merged.state_dict()
    changed = {name for name in frozen if not torch.equal(weights[name], frozen[name])}
    assert changed == {f"transformer.blocks.{i}.ffn.experts.{w}" for i in (1, 3) for w in ("w1", "w2")}
    for name in changed:  # each expert's update is a rank-2 LoRA product
        assert all(torch.linalg.matrix_rank(d, rtol=1e-4) <= 2 for d in (weights[name] - frozen[name]).double())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, lora_logits, rtol=0, atol=1e-5)
    prefix = "transformer.blocks.3.ffn."
    expected = _reference_moe(seen["h"].reshape(-1, 32), weights[prefix + "router.weight"],
                              weights[prefix + "experts.w1"], weights[prefix + "experts.b1"],
                              weights[prefix + "experts.w2"], weights[prefix + "experts.b2"], t=0.9)
    torch.testing.assert_close(seen["y"].reshape(-1, 32).double(), expected, rtol=0, atol=1e-5)
