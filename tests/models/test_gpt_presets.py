"""Presets, parameter counts and FLOP counts."""

from __future__ import annotations

import pytest
import torch

from helpers.gpt import tiny_config
from xmoe.models import GPT, flops_breakdown, flops_per_token, moe_flops_per_token, num_params
from xmoe.presets import PRESETS, get_preset, list_presets

GPT2_MOE = [
    "gpt2-switch-8x3072",
    "gpt2-topk-16x1536",
    "gpt2-topk-64x384",
    "gpt2-xmoe-16x1536",
    "gpt2-xmoe-32x768",
    "gpt2-xmoe-64x384",
]


def test_gpt2_family_is_parameter_matched_at_323m():
    counts = {name: num_params(get_preset(name)) for name in GPT2_MOE}
    for name, n in counts.items():
        assert abs(n - 323e6) / 323e6 < 0.01, (name, n)
    assert max(counts.values()) / min(counts.values()) - 1 < 0.01
    assert num_params(get_preset("gpt2-dense")) == 124_439_808  # GPT-2 small, as nanoGPT counts it


def test_gpt2_family_experts_and_routers():
    expected = {
        "gpt2-switch-8x3072": ("topk", 8, 3072, 1),
        "gpt2-topk-16x1536": ("topk", 16, 1536, 2),
        "gpt2-topk-64x384": ("topk", 64, 384, 8),
        "gpt2-xmoe-16x1536": ("threshold", 16, 1536, 2),
        "gpt2-xmoe-32x768": ("threshold", 32, 768, 4),
        "gpt2-xmoe-64x384": ("threshold", 64, 384, 8),
    }
    for name, (router, experts, width, k) in expected.items():
        moe = get_preset(name).moe
        assert (moe.router, moe.num_experts, moe.expert_dim, moe.top_k) == (router, experts, width, k)
        assert (moe.capacity_factor, moe.min_capacity, moe.eval_capacity_factor) == (8.0, 4, None)
        assert moe.activation == "gelu" and moe.expert_bias and moe.init_std == 0.02
        if router == "threshold":
            assert moe.threshold == 0.9


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gpt2-")])
def test_gpt2_presets_build_with_the_counted_parameters(name):
    with torch.device("meta"):  # 323M parameters without allocating them
        model = GPT(get_preset(name))
    assert num_params(model) == num_params(model.cfg)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("gpt2-")])
def test_small_presets_build_and_run(name):
    cfg = get_preset(name, vocab_size=100)
    assert cfg.vocab_size == 100
    model = GPT(cfg)
    assert num_params(model) == num_params(cfg)
    out = model(torch.randint(0, 100, (1, 8)))
    assert out.logits_BLV.shape == (1, 8, 100)


def test_cpu_family_mirrors_the_gpt2_family():
    gpt2 = {n.removeprefix("gpt2-").split("-")[0] + str(get_preset(n).moe and get_preset(n).moe.num_experts)
            for n in PRESETS if n.startswith("gpt2-")}
    cpu = {n.removeprefix("cpu-").split("-")[0] + str(get_preset(n).moe and get_preset(n).moe.num_experts)
           for n in PRESETS if n.startswith("cpu-")}
    assert gpt2 == cpu and len(cpu) == 7
    counts = [num_params(get_preset(n)) for n in PRESETS if n.startswith("cpu-") and n != "cpu-dense"]
    assert max(counts) / min(counts) - 1 < 0.01
    assert {"debug-dense", "debug-xmoe"} <= set(PRESETS)


def test_unknown_preset():
    with pytest.raises(ValueError, match="gpt2-xmoe-64x384"):
        get_preset("gpt2-xmoe")


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config(router=None),
        tiny_config(n_layer=5, moe_every=2),
        tiny_config(n_layer=3, moe_every=1, activation="swiglu", expert_bias=False),
        tiny_config(n_layer=2, moe_every=2, activation="relu", expert_bias=True),
    ],
)
def test_num_params_of_config_equals_built_model(cfg):
    model = GPT(cfg)
    assert num_params(cfg) == num_params(model)
    assert num_params(cfg, non_embedding=True) == num_params(model, non_embedding=True)
    assert num_params(model) - num_params(model, non_embedding=True) == cfg.block_size * cfg.d_model


def test_flops_by_hand():
    cfg = tiny_config(n_layer=4, moe_every=2)  # D 32, F 64, ctx 32, V 50, 8 experts x 16, top_k 2
    D, F, ctx, V = 32, 64, 32, 50
    fl = flops_breakdown(cfg)
    assert fl.attention == 4 * (8 * D * D + 4 * ctx * D)
    assert fl.dense_ffn == 2 * 4 * D * F
    assert fl.router == 2 * 2 * D * 8
    assert fl.experts == 2 * 2 * (2 * 2 * D * 16)
    assert fl.lm_head == 2 * D * V
    assert flops_per_token(cfg) == fl.total == sum(
        (fl.attention, fl.dense_ffn, fl.router, fl.experts, fl.lm_head)
    )
    assert flops_breakdown(cfg, context=0).attention == 4 * 8 * D * D


def test_parameter_matched_family_activates_one_dense_ffn():
    dense = flops_breakdown(get_preset("gpt2-dense"))
    for name in GPT2_MOE:
        fl = flops_breakdown(get_preset(name))
        assert fl.experts == 6 * 4 * 768 * 3072  # the dense FFN of the 6 MoE layers
        assert fl.dense_ffn + fl.experts == dense.dense_ffn
        assert fl.attention == dense.attention and fl.lm_head == dense.lm_head


def test_measured_moe_flops():
    cfg = get_preset("gpt2-xmoe-64x384")
    pair = 2 * 2 * 768 * 384
    assert moe_flops_per_token(cfg, [8] * 6) == flops_breakdown(cfg).experts
    assert moe_flops_per_token(cfg, [1, 2, 3, 4, 5, 6]) == 21 * pair
    assert moe_flops_per_token(cfg, 3.5) == 6 * 3.5 * pair
    with pytest.raises(ValueError, match="6 MoE layers"):
        moe_flops_per_token(cfg, [1.0, 2.0])
    with pytest.raises(ValueError, match="dense"):
        moe_flops_per_token(get_preset("gpt2-dense"), 1.0)
    # agrees with the statistics the layers report
    small = tiny_config(n_layer=4, moe_every=1)
    out = GPT(small)(torch.randint(0, 50, (2, 16)))
    measured = moe_flops_per_token(small, [s.kept_per_token for s in out.stats])
    assert measured == pytest.approx(sum(s.expert_flops_per_token.item() for s in out.stats))


def test_list_presets_rows():
    rows = {r.name: r for r in list_presets()}
    assert list(rows) == list(PRESETS)
    assert rows["gpt2-xmoe-64x384"].experts == "64x384 t=0.9"
    assert rows["gpt2-topk-16x1536"].experts == "16x1536 top-2"
    assert rows["gpt2-dense"].experts == "dense" and rows["gpt2-dense"].moe_flops_per_token == 0
    assert rows["gpt2-switch-8x3072"].params == num_params(get_preset("gpt2-switch-8x3072"))
    assert rows["gpt2-xmoe-64x384"].moe_flops_per_token == 6 * 4 * 768 * 3072
