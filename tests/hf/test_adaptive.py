"""xmoe.hf.adaptive's rule on tiny models of every supported family, built from configs: the
top-k setting reproduces each model exactly; at other settings each token keeps the experts and
weights of a float64 loop written here from each family's published router (softmax over all
experts, gpt-oss's softmax over its top-k logits, DeepSeek-V3's group-limited sigmoid, Gemma-4's
scaled softmax); lower thresholds engage fewer experts; the "xmoe" experts implementation skips
unused slots."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmoe.hf import adaptive, experts_per_token, is_adapted
from xmoe.hf.adaptive import moe_blocks, moe_routers, own_top_k
from xmoe.hf.experts import xmoe_experts_forward

from helpers.hf import FAMILIES, VOCAB, tiny_family

# Every family, and each normalisation its config can choose (OLMoE, Qwen2-MoE, Qwen3-MoE,
# FlexOlmo ship norm_topk_prob False, Qwen3-Next and the sigmoid families True).
CASES = [("olmoe", {}), ("olmoe", {"norm_topk_prob": True}), ("flex_olmo", {}), ("qwen2_moe", {}),
         ("qwen3_moe", {"norm_topk_prob": True}), ("qwen3_moe", {}), ("qwen3_next", {}), ("qwen3_5_moe", {}),
         ("mixtral", {}), ("gemma4", {}), ("gpt_oss", {}), ("deepseek_v3", {}), ("deepseek_v3", {"norm_topk_prob": False}),
         ("glm4_moe", {}), ("glm4_moe_lite", {})]
IDS = [family + "".join(f"-{k}={v}" for k, v in overrides.items()) for family, overrides in CASES]


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_the_models_own_top_k_setting_reproduces_its_logits(family, overrides):
    model = tiny_family(family, **overrides)
    x = torch.randint(VOCAB, (2, 14))
    with torch.no_grad():
        reference = model(x).logits
        adaptive(model, threshold=1.0, max_experts=own_top_k(model))
        adapted = model(x).logits
    assert model.config._experts_implementation == "xmoe" and is_adapted(model)
    torch.testing.assert_close(adapted, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_families_that_weigh_their_top_k_only_are_themselves_at_threshold_one(family):
    model = tiny_family(family)
    x = torch.randint(VOCAB, (2, 14))
    with torch.no_grad():
        reference = model(x).logits
        adaptive(model, threshold=1.0)  # no cap needed: the candidates are the family's own k
        torch.testing.assert_close(model(x).logits, reference, rtol=0, atol=1e-5)


# --- the float64 reference: each family's router, one token at a time -------------------------


def keep_prefix(mass: dict[int, float], threshold: float, cap: int | None) -> list[int]:
    """The threshold rule by hand: experts from most to least mass (ties: lower index first),
    each taken while the mass taken so far is below the threshold, at most ``cap``."""
    kept, taken = [], 0.0
    for e in sorted(mass, key=lambda e: (-mass[e], e)):
        if kept and (taken >= threshold or len(kept) == cap):
            break
        kept.append(e)
        taken += mass[e]
    return kept


def top(values: dict[int, float], k: int) -> list[int]:
    return sorted(values, key=lambda e: (-values[e], e))[:k]


def softmax(values: dict[int, float]) -> dict[int, float]:
    z = sum(math.exp(v) for v in values.values())
    return {e: math.exp(v) / z for e, v in values.items()}


def route64(family: str, router, config, x: torch.Tensor, threshold: float, cap: int | None) -> dict[int, float]:
    """The kept experts of one token and their weights, in float64, from the family's published
    router: what mass the threshold accumulates and how the family weighs what it keeps."""
    x = x.double()
    if family == "gemma4":  # RMS-normalised, scaled input; softmax over all experts
        h = x * (x.pow(2).mean() + router.eps) ** -0.5 * router.scale.double() * x.numel() ** -0.5
        p = softmax(dict(enumerate((router.proj.weight.double() @ h).tolist())))
        kept = keep_prefix(p, threshold, cap)
        return {e: p[e] / sum(p[j] for j in kept) * router.per_expert_scale[e].item() for e in kept}
    if family == "gpt_oss":  # softmax over the top-k logits (with bias) only
        logits = dict(enumerate((router.weight.double() @ x + router.bias.double()).tolist()))
        q = softmax({e: logits[e] for e in top(logits, config.num_experts_per_tok)})
        kept = keep_prefix(q, threshold, cap)
        return softmax({e: logits[e] for e in kept})
    if family in ("deepseek_v3", "glm4_moe", "glm4_moe_lite"):  # group-limited choice by biased sigmoid
        s = dict(enumerate(torch.sigmoid(router.weight.double() @ x).tolist()))
        biased = {e: s[e] + router.e_score_correction_bias[e].item() for e in s}
        size = len(s) // config.n_group
        group_score = {g: sum(sorted((biased[e] for e in range(g * size, (g + 1) * size)), reverse=True)[:2])
                       for g in range(config.n_group)}
        allowed = [e for g in top(group_score, config.topk_group) for e in range(g * size, (g + 1) * size)]
        chosen = top({e: biased[e] for e in allowed}, config.num_experts_per_tok)
        kept = keep_prefix({e: s[e] / sum(s[j] for j in chosen) for e in chosen}, threshold, cap)
        norm = sum(s[e] for e in kept) if config.norm_topk_prob else 1.0
        return {e: s[e] / norm * config.routed_scaling_factor for e in kept}
    p = softmax(dict(enumerate((router.weight.double() @ x).tolist())))  # softmax over all experts
    kept = keep_prefix(p, threshold, cap)
    renormalise = family in ("mixtral", "qwen3_5_moe") or config.norm_topk_prob
    return {e: p[e] / (sum(p[j] for j in kept) if renormalise else 1.0) for e in kept}


def expert64(family: str, experts, config, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on one token, in float64."""
    x = x.double()
    if family == "gpt_oss":  # transposed weights, biases, interleaved gate/up, clamped GLU
        gate_up = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
        gate = gate_up[0::2].clamp(max=experts.limit)
        up = gate_up[1::2].clamp(-experts.limit, experts.limit)
        h = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return h @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()
    gate, up = (experts.gate_up_proj[e].double() @ x).chunk(2)
    act = F.gelu(gate, approximate="tanh") if family == "gemma4" else F.silu(gate)
    return experts.down_proj[e].double() @ (act * up)


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
@pytest.mark.parametrize("threshold,max_experts", [(0.4, None), (0.8, None), (0.95, 3)])
def test_routing_and_experts_equal_a_float64_loop(family, overrides, threshold, max_experts):
    model = tiny_family(family, **overrides)
    adaptive(model, threshold=threshold, max_experts=max_experts)
    router, experts = moe_routers(model)[0], moe_blocks(model)[0].experts
    config = model.config
    x_TD = torch.randn(18, 32)
    with torch.no_grad():
        _, weights_TK, index_TK = router(x_TD)
        got_TD = experts(x_TD, index_TK, weights_TK)
    for t in range(x_TD.shape[0]):
        expected = route64(family, router, config, x_TD[t], threshold, max_experts)
        runs = weights_TK[t] != 0
        got = dict(zip(index_TK[t][runs].tolist(), weights_TK[t][runs].double().tolist()))
        assert sorted(got) == sorted(expected), f"token {t}: experts {sorted(got)}, expected {sorted(expected)}"
        for e, w in expected.items():
            assert got[e] == pytest.approx(w, rel=1e-5, abs=1e-6)
        out = sum(w * expert64(family, experts, config, e, x_TD[t]) for e, w in expected.items())
        torch.testing.assert_close(got_TD[t].double(), out, rtol=1e-5, atol=1e-5)


def test_the_reference_sees_what_each_familys_rule_adds():
    """The float64 loop is not vacuous on the tiny models the tests use: DeepSeek-V3's bias and
    group limit change which experts some tokens get, Gemma-4's per-expert scale their weights."""
    x_TD = torch.randn(32, 32)
    deepseek = tiny_family("deepseek_v3")
    router, config = moe_routers(deepseek)[0], deepseek.config

    def chosen() -> list[list[int]]:
        return [sorted(route64("deepseek_v3", router, config, x, 1.0, None)) for x in x_TD]

    reference = chosen()
    config.topk_group = config.n_group  # every group allowed
    assert chosen() != reference
    config.topk_group = 2
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
    assert chosen() != reference
    gemma = tiny_family("gemma4")
    router = moe_routers(gemma)[0]
    scaled = route64("gemma4", router, gemma.config, x_TD[0], 0.9, None)
    with torch.no_grad():
        router.per_expert_scale.fill_(1.0)
    assert sum(route64("gemma4", router, gemma.config, x_TD[0], 0.9, None).values()) == pytest.approx(1.0)
    assert sum(scaled.values()) != pytest.approx(1.0)


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
    assert not any(capped.histogram[3:]) and capped.histogram[2] > 0


def test_xmoe_experts_skip_unused_slots():
    """Slots of weight 0 or with an index outside [0, E) are never computed: an expert whose
    weights are NaN, named only by such slots, leaves every output finite and exact."""
    model = tiny_family("olmoe")
    experts = moe_blocks(model)[0].experts
    T, K, E = 10, 4, 8
    x_TD = torch.randn(T, 32)
    index_TK = torch.randint(E - 1, (T, K))
    weights_TK = torch.rand(T, K)
    index_TK[::2, 2:] = E  # sentinel slots
    weights_TK[::2, 2:] = float("nan")  # never read
    index_TK[1::2, 3] = E - 1  # unused slots as adaptive() writes them: a real expert at weight 0
    weights_TK[1::2, 3] = 0.0
    with torch.no_grad():
        experts.gate_up_proj[E - 1] = float("nan")
        got = xmoe_experts_forward(experts, x_TD, index_TK, weights_TK)
    expected = torch.zeros(T, 32, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(index_TK[t, k])
            if 0 <= e < E - 1:
                expected[t] += weights_TK[t, k].double() * expert64("olmoe", experts, model.config, e, x_TD[t])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
