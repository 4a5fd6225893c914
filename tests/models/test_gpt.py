"""GPT forward: shapes, causality, losses, MoE placement, init, training, config validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers.gpt import record_routing, sharpen_routers, tiny_config
from xmoe.models import GPT, IGNORE_INDEX, GPTConfig
from xmoe.presets import get_preset
from xmoe.moe import MoEConfig, MoELayer


def test_output_shapes_and_types():
    cfg = tiny_config(n_layer=4, moe_every=2)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    out = model(idx, idx)
    assert out.logits_BLV.shape == (3, 10, cfg.vocab_size)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32
    assert out.z_loss.shape == () and out.z_loss.dtype == torch.float32
    assert len(out.stats) == 2 and all(s.num_tokens == 30 for s in out.stats)
    assert model(idx).loss is None


def test_dense_model_has_zero_aux_loss_and_no_stats():
    model = GPT(tiny_config(router=None))
    out = model(torch.randint(0, 50, (2, 8)))
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.stats == ()


def test_loss_is_cross_entropy_and_skips_ignored_targets():
    model = GPT(tiny_config())
    idx = torch.randint(0, 50, (2, 8))
    targets = torch.randint(0, 50, (2, 8))
    targets[:, :3] = IGNORE_INDEX
    out = model(idx, targets)
    keep = targets != IGNORE_INDEX
    expected = -out.logits_BLV.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("router", [None, "threshold", "topk"])
def test_future_tokens_never_change_past_logits(router):
    """Causality in eval mode (dropless MoE): editing token j changes no logit or routing
    decision before j, and does change position j's."""
    cfg = tiny_config(router=router)
    model = GPT(cfg).eval()
    sharpen_routers(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    j = 9
    edited = idx.clone()
    edited[:, j] = (idx[:, j] + 1) % cfg.vocab_size
    with torch.no_grad(), record_routing(model) as calls_a:
        a = model(idx).logits_BLV
    with torch.no_grad(), record_routing(model) as calls_b:
        b = model(edited).logits_BLV
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j] - b[:, j]).abs().max() > 1e-3
    for i in calls_a:
        kept_a = calls_a[i][0].kept_TE.reshape(2, 16, -1)
        kept_b = calls_b[i][0].kept_TE.reshape(2, 16, -1)
        assert torch.equal(kept_a[:, :j], kept_b[:, :j])


def test_aux_loss_is_the_sum_over_moe_layers():
    """Recomputed by hand from each layer's router probabilities: E * sum_e f_e * P_e."""
    cfg = tiny_config(n_layer=3, moe_every=1)
    model = GPT(cfg)
    sharpen_routers(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with record_routing(model) as calls:
        out = model(idx, idx)
    per_layer = []
    for i in calls:
        probs_TE = calls[i][0].probs_TE
        E = probs_TE.shape[-1]
        f_E = torch.zeros(E).index_add_(0, probs_TE.argmax(-1), torch.ones(probs_TE.shape[0])) / probs_TE.shape[0]
        per_layer.append(E * (f_E * probs_TE.mean(0)).sum())
    assert len(per_layer) == 3 and len({round(v.item(), 6) for v in per_layer}) == 3  # distinct layers
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).sum())
    z = sum(torch.logsumexp(calls[i][0].logits_TE, -1).square().mean() for i in calls)
    torch.testing.assert_close(out.z_loss, z)
    # the aux loss is unscaled (no 0.01 inside) and trains the routers
    assert out.aux_loss.item() > 2.5  # about 1 per layer at best balance
    out.aux_loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.moe_layers())


@pytest.mark.parametrize(
    "n_layer, moe_every, expected",
    [(12, 2, (1, 3, 5, 7, 9, 11)), (7, 3, (2, 5)), (3, 1, (0, 1, 2)), (4, 4, (3,))],
)
def test_moe_placement(n_layer, moe_every, expected):
    """MoE in layer i (1-based) iff i % moe_every == 0: paper's 2, 4, ..., 12 for moe_every=2."""
    cfg = tiny_config(n_layer=n_layer, moe_every=moe_every)
    assert cfg.moe_layer_indices == expected
    model = GPT(cfg)
    assert tuple(i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)) == expected
    assert len(model.moe_layers()) == len(expected)


def test_gpt2_family_places_moe_in_even_layers():
    assert [i + 1 for i in get_preset("gpt2-xmoe-64x384").moe_layer_indices] == [2, 4, 6, 8, 10, 12]
    assert get_preset("gpt2-dense").moe_layer_indices == ()


def test_gpt2_init_and_tied_embeddings():
    n_layer = 8
    cfg = GPTConfig(
        vocab_size=300, block_size=64, n_layer=n_layer, n_head=4, d_model=128, d_ff=512, moe_every=2,
        moe=MoEConfig(model_dim=128, num_experts=8, expert_dim=256, init_std=0.02),
    )
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    residual_std = 0.02 / math.sqrt(2 * n_layer)

    def close(t, std):
        return abs(t.std().item() - std) < 0.05 * std

    assert close(model.wte.weight, 0.02) and close(model.wpe.weight, 0.02)
    assert close(model.blocks[0].attn.qkv.weight, 0.02) and close(model.blocks[0].attn.proj.weight, residual_std)
    assert close(model.blocks[0].ffn.up.weight, 0.02) and close(model.blocks[0].ffn.down.weight, residual_std)
    experts = model.blocks[1].ffn.experts
    assert close(experts.w1, 0.02) and close(experts.w2, residual_std)
    assert close(model.blocks[1].ffn.router.weight, 0.02)
    assert model.blocks[0].attn.qkv.bias.abs().max() == 0 and experts.b2.abs().max() == 0


def test_loss_decreases_training_on_a_repeated_batch():
    cfg = get_preset("debug-xmoe")
    model = GPT(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.randint(0, cfg.vocab_size, (4, 33))
    idx, targets = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        out = model(idx, targets)
        loss = out.loss + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] > 5.0  # about ln(256) at init
    assert losses[-1] < 0.5 * losses[0]


def test_every_parameter_gets_a_gradient():
    model = GPT(tiny_config(router="threshold", n_layer=2, moe_every=1))
    idx = torch.randint(0, 50, (2, 8))
    out = model(idx, idx)
    (out.loss + 0.01 * out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_cache_in_training_mode_and_too_long_inputs_are_refused():
    model = GPT(tiny_config(block_size=8))
    with pytest.raises(ValueError, match="eval"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _cfg_kwargs(**changes):
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64)
    return base | changes


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"block_size": -1}, "block_size"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 3}, "n_head"),
        ({"d_model": 2.5}, "d_model"),
        ({"d_ff": 0}, "d_ff"),
        ({"dropout": 1.0}, "dropout"),
        ({"moe_every": 0}, "moe_every"),
        ({"init_std": 0.0}, "init_std"),
        ({"layer_norm_eps": -1e-5}, "layer_norm_eps"),
        ({"moe": "threshold"}, "moe"),
        ({"moe": MoEConfig(model_dim=32, num_experts=4, expert_dim=8), "moe_every": 3}, "moe_every"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}\b"):
        GPTConfig(**_cfg_kwargs(**changes))


def test_moe_model_dim_must_equal_d_model():
    with pytest.raises(ValueError, match=r"moe\.model_dim=48.*d_model=32.*model_dim=d_model"):
        GPTConfig(**_cfg_kwargs(moe=MoEConfig(model_dim=48, num_experts=4, expert_dim=8)))
    GPTConfig(**_cfg_kwargs(moe=MoEConfig(model_dim=32, num_experts=4, expert_dim=8)))  # fine


def test_models_import_only_moe_and_torch():
    code = (
        "import sys\n"
        "from xmoe.models import *  # every export: they are imported on first use (xmoe.lazy)\n"
        "import xmoe.models.seq2seq\n"
        "bad = [m for m in sys.modules if m.startswith('xmoe.') and m.split('.')[1] not in ('moe', 'models', 'errors', 'lazy')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["gpt2-xmoe-64x384", "cpu-dense"])
def test_config_round_trips_through_json(name):
    from xmoe.training.config import from_dict, to_dict  # the one serializer for every config

    cfg = get_preset(name)
    assert from_dict(GPTConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="n_embd"):
        from_dict(GPTConfig, to_dict(cfg) | {"n_embd": 768})
