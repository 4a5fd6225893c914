"""Converting this project's GPT: exact at t >= 1; at lower t the reported share of FFN FLOPs is
the count of engaged experts, recomputed here from the router weights by hand."""

from __future__ import annotations

import math

import pytest
import torch

from xmoe.conversion import ConversionConfig, RouterFitConfig, convert_gpt
from xmoe.sweep import gpt_logits, measure_layers, threshold_dial
from xmoe.models.gpt import GPT
from xmoe.presets import get_preset
from xmoe.moe import MoELayer

FAST = RouterFitConfig(steps=30)


def dense_model():
    model = GPT(get_preset("debug-dense", vocab_size=50)).eval()
    with torch.no_grad():  # non-zero biases, so that the shared output bias is really tested
        for block in model.blocks:
            block.ffn.up.bias.normal_()
            block.ffn.down.bias.normal_(std=0.1)
    return model


@pytest.mark.parametrize("partition", ["contiguous", "clustered"])
def test_converted_gpt_equals_the_dense_gpt_at_t_1(partition):
    dense = dense_model()
    x = torch.randint(50, (2, 16))
    sparse, reports = convert_gpt(dense, torch.randint(50, (4, 16)),
                                  ConversionConfig(num_experts=8, partition=partition, router=FAST))
    assert len(reports) == 2 and sparse.cfg.moe_layer_indices == (0, 1)
    assert sparse.cfg.moe.combine == "ones" and sparse.cfg.moe.threshold == 1.0
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).logits_BLV, dense(x).logits_BLV, rtol=1e-5, atol=1e-5)
        for t in (1.0, 1.5):
            threshold_dial(sparse)(t)
            point = measure_layers(sparse, [(x, x)], gpt_logits)
            assert point.moe_flops_ratio == 1.0 and point.experts_per_token == 8


def engaged_experts(probs, t):
    """Experts the threshold rule engages for one token, by hand: most probable first, until the
    mass before the next one reaches t."""
    mass, count = 0.0, 0
    for p in sorted(probs, reverse=True):
        if count and mass >= t:
            break
        mass += p
        count += 1
    return count


def test_flops_fraction_at_lower_t_is_the_count_of_engaged_experts():
    dense = dense_model()
    sparse, _ = convert_gpt(dense, torch.randint(50, (4, 16)), ConversionConfig(num_experts=8, router=FAST))
    x = torch.randint(50, (3, 16))
    inputs = []
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.append((m, a[0])))
             for m in sparse.modules() if isinstance(m, MoELayer)]
    threshold_dial(sparse)(0.6)
    point = measure_layers(sparse, [(x, x)], gpt_logits)
    for h in hooks:
        h.remove()
    engaged = total = 0
    for layer, x_BLD in inputs:
        logits = x_BLD.reshape(-1, 64).double() @ layer.router.weight.double().T
        for row in logits.softmax(dim=-1).tolist():
            engaged += engaged_experts(row, 0.6)
            total += 8
    assert 0 < engaged < total
    assert point.moe_flops_ratio == pytest.approx(engaged / total, abs=1e-9)
    assert point.experts_per_token == pytest.approx(8 * engaged / total, abs=1e-9)
    logits = sparse(x).logits_BLV.double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x.reshape(-1))
    assert point.loss == pytest.approx(ce.item(), rel=1e-6)
    assert math.isfinite(point.perplexity)


def test_non_dense_models_and_bad_expert_counts_are_refused():
    with pytest.raises(ValueError, match="not dense"):
        convert_gpt(GPT(get_preset("debug-xmoe", vocab_size=50)), torch.randint(50, (1, 8)),
                    ConversionConfig(num_experts=8))
    with pytest.raises(ValueError, match="do not divide"):
        convert_gpt(dense_model(), torch.randint(50, (1, 8)), ConversionConfig(num_experts=7))
    with pytest.raises(ValueError, match="partition"):
        ConversionConfig(num_experts=8, partition="random")
