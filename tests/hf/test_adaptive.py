"""xmoe.hf.adaptive on tiny OLMoE, Qwen2-MoE, Qwen3-MoE and Mixtral models built from configs:
the top-k setting reproduces each model exactly; lower thresholds engage fewer experts, each
adapted block equals a float64 loop over tokens; the "xmoe" experts implementation skips sentinel
slots; bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from xmoe.hf import adaptive, experts_per_token, is_adapted
from xmoe.hf.adaptive import moe_blocks
from xmoe.hf.experts import xmoe_experts_forward

from helpers.hf import FAMILIES, VOCAB, tiny_family

# Every family's rule; Qwen3-MoE ships norm_topk_prob=True, the others False (Mixtral has none).
CASES = [("olmoe", False), ("olmoe", True), ("qwen2_moe", False), ("qwen3_moe", True), ("qwen3_moe", False),
         ("mixtral", None)]


def build(family, norm):
    return tiny_family(family) if norm is None else tiny_family(family, norm_topk_prob=norm)


@pytest.mark.parametrize("family,norm", CASES)
def test_the_models_own_top_k_setting_reproduces_its_logits(family, norm):
    model = build(family, norm)
    x = torch.randint(VOCAB, (2, 14))
    with torch.no_grad():
        reference = model(x).logits
        adaptive(model, threshold=1.0, max_experts=model.config.num_experts_per_tok)
        adapted = model(x).logits
    assert model.config._experts_implementation == "xmoe" and is_adapted(model)
    torch.testing.assert_close(adapted, reference, rtol=0, atol=1e-5)


def naive_block(block, x_TD: torch.Tensor, *, threshold: float, max_experts: int | None, renormalize: bool) -> torch.Tensor:
    """The adapted MoE block in float64, one token at a time: softmax over all experts, keep the
    smallest prefix of the sorted probabilities reaching ``threshold`` (capped), weigh, add."""
    w_ED = block.gate.weight.double()
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    out = torch.zeros_like(x_TD, dtype=torch.float64)
    for t, x in enumerate(x_TD.double()):
        p = (w_ED @ x).softmax(-1)
        order = p.argsort(descending=True).tolist()
        kept, mass = [], 0.0
        for e in order:
            if kept and (mass >= threshold or (max_experts and len(kept) == max_experts)):
                break
            kept.append(e)
            mass += p[e].item()
        weights = p[kept] / p[kept].sum() if renormalize else p[kept]
        for e, w in zip(kept, weights):
            g, u = (gate_up[e] @ x).chunk(2)
            out[t] += w * (down[e] @ (F.silu(g) * u))
    if hasattr(block, "shared_expert"):  # Qwen2-MoE: a shared expert behind a sigmoid gate, for every token
        xf = x_TD.double()
        shared = block.shared_expert
        h = F.silu(xf @ shared.gate_proj.weight.double().T) * (xf @ shared.up_proj.weight.double().T)
        out += torch.sigmoid(xf @ block.shared_expert_gate.weight.double().T) * (h @ shared.down_proj.weight.double().T)
    return out


@pytest.mark.parametrize("family,norm", CASES)
@pytest.mark.parametrize("threshold,max_experts", [(0.4, None), (0.8, None), (0.95, 3)])
def test_adapted_blocks_equal_a_float64_loop(family, norm, threshold, max_experts):
    model = build(family, norm)
    adaptive(model, threshold=threshold, max_experts=max_experts)
    block = moe_blocks(model)[0]
    x_BLD = torch.randn(2, 9, 32)
    renormalize = family == "mixtral" or bool(norm)
    with torch.no_grad():
        got = block(x_BLD).reshape(-1, 32)
    expected = naive_block(block, x_BLD.reshape(-1, 32), threshold=threshold, max_experts=max_experts,
                           renormalize=renormalize)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lower_thresholds_engage_fewer_experts_per_token(family):
    model = tiny_family(family)
    x = torch.randint(VOCAB, (2, 20))
    means, histograms = [], []
    for t in (0.3, 0.6, 0.9):
        adaptive(model, threshold=t)
        with torch.no_grad(), experts_per_token(model) as counts:
            model(x)
        means.append(counts.mean)
        histograms.append(counts.histogram)
    assert means[0] < means[1] < means[2]
    assert sum(c > 0 for c in histograms[1]) >= 2  # a variable number of experts per token
    adaptive(model, threshold=0.99, max_experts=2)
    with torch.no_grad(), experts_per_token(model) as capped:
        model(x)
    assert capped.histogram[3:] == [0] * 6 and capped.histogram[2] > 0


def test_xmoe_experts_skip_sentinel_slots():
    model = tiny_family("olmoe")
    experts = moe_blocks(model)[0].experts
    T, K, E = 10, 4, 8
    x_TD = torch.randn(T, 32)
    index_TK = torch.randint(E, (T, K))
    index_TK[::2, 2:] = E  # sentinel slots, as a threshold router leaves them
    index_TK[1, 3] = -1  # any index outside [0, E) is a sentinel
    weights_TK = torch.rand(T, K)
    weights_TK[::2, 2:] = float("nan")  # never read
    with torch.no_grad():
        got = xmoe_experts_forward(experts, x_TD, index_TK, weights_TK)
    expected = torch.zeros(T, 32, dtype=torch.float64)
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
    for t in range(T):
        for k in range(K):
            e = int(index_TK[t, k])
            if 0 <= e < E:
                g, u = (gate_up[e] @ x_TD[t].double()).chunk(2)
                expected[t] += weights_TK[t, k].double() * (down[e] @ (F.silu(g) * u))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_generate_on_an_adapted_model():
    model = tiny_family("qwen3_moe", norm_topk_prob=True)
    prompt = torch.randint(VOCAB, (1, 4))
    reference = model.generate(prompt, max_new_tokens=10, do_sample=False)
    adaptive(model, threshold=1.0, max_experts=2)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False), reference)
    adaptive(model, threshold=0.3)
    assert model.generate(prompt, max_new_tokens=10, do_sample=False).shape == reference.shape


def test_saving_an_adapted_model_writes_the_original_weights(tmp_path):
    model = tiny_family("mixtral")
    x = torch.randint(VOCAB, (1, 8))
    with torch.no_grad():
        reference = model(x).logits
    adaptive(model, threshold=0.5)
    model.save_pretrained(tmp_path / "m")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not is_adapted(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference, rtol=0, atol=1e-6)


def test_bad_input_is_refused_clearly():
    model = tiny_family("olmoe")
    for bad in (0, -0.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="threshold must be a number > 0"):
            adaptive(model, threshold=bad)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="max_experts must be an integer from 1 to the model's 8 experts"):
            adaptive(model, threshold=0.5, max_experts=bad)
    adaptive(model, threshold=0.5)
    with pytest.raises(ValueError, match="inference only"):
        model.train()
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"supports olmoe, qwen2_moe, qwen3_moe, mixtral .*'gpt2'"):
        adaptive(gpt2, threshold=0.5)
