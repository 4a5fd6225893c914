"""Low precision: routing stays fp32 (decisions are discontinuous in p, docs/method.md step 1)
for a bf16 layer and under autocast, and outputs stay within bf16 rounding of fp32 ones.

CPU bf16: the style guide's "every test on CPU"; these are cheap at these sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.moe import CPU_BACKENDS, MARGIN, make_layer, oracle_routing

CFG = dict(threshold=0.8, capacity_factor=1.5, min_capacity=1)  # D=8, F=16: grouped_mm-ready in bf16


def _bf16_valued_layer(backend: str, **cfg):
    """An fp32 layer whose weights are exactly representable in bf16, and its bf16 copy: the two
    route identically if (and only if) the bf16 one routes on fp32 logits."""
    layer = make_layer(backend=backend, **{**CFG, **cfg})
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
        for p in layer.parameters():
            p.copy_(p.bfloat16().float())
    return layer, copy.deepcopy(layer).to(torch.bfloat16)


def _x(seed: int = 0, n: int = 32) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_bf16_layer_routes_in_fp32(backend: str, rule: str) -> None:
    layer32, layer16 = _bf16_valued_layer(backend, router=rule)
    x16 = _x()
    x32 = x16.float()

    d16 = layer16.route(x16)
    assert d16.logits_TE.dtype == torch.float32 and d16.probs_TE.dtype == torch.float32
    # The fp32-logit routing of the same bf16 weights, upcast: by the library on fp32 ...
    d32 = layer32.route(x32)
    assert torch.equal(d16.logits_TE, d32.logits_TE)
    assert torch.equal(d16.kept_TE, d32.kept_TE) and torch.equal(d16.wanted_TE, d32.wanted_TE)
    # ... and by the float64 oracle on the upcast weights.
    routing = oracle_routing(layer32, x32)
    assert routing.margin > MARGIN
    assert torch.equal(d16.kept_TE, routing.kept_mask(8))
    # bf16 logits would have routed differently somewhere (so the checks above can fail).
    bf16_logits = (x16 @ layer16.router.weight.T).float()
    assert (bf16_logits - d32.logits_TE).abs().max() > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_layer_output_close_to_fp32(backend: str, activation: str) -> None:
    layer32, layer16 = _bf16_valued_layer(backend, activation=activation)
    x16 = _x(1).requires_grad_(True)
    x32 = x16.detach().float().requires_grad_(True)
    out16, out32 = layer16(x16), layer32(x32)
    assert out16.output.dtype == torch.bfloat16
    torch.testing.assert_close(out16.output.float(), out32.output, rtol=2e-2, atol=2e-2)
    g = torch.randn(x32.shape, generator=torch.Generator().manual_seed(2))
    (out16.output.float() * g).sum().backward()
    (out32.output * g).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=5e-2, atol=5e-2)
    for p16, p32 in zip(layer16.parameters(), layer32.parameters()):
        assert p16.grad.dtype == torch.bfloat16
        scale = p32.grad.abs().max().item() + 1e-3
        torch.testing.assert_close(p16.grad.float() / scale, p32.grad / scale, rtol=0, atol=5e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_router_fp32_and_output_dtype(backend: str, in_dtype: torch.dtype) -> None:
    layer = make_layer(backend=backend, **CFG)
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    x = _x(3).to(in_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decision = layer.route(x)
        out = layer(x)
        bf16_logits = x @ layer.router.weight.T  # what an unguarded gate would compute
    assert bf16_logits.dtype == torch.bfloat16  # autocast really is on
    assert decision.logits_TE.dtype == torch.float32 and decision.probs_TE.dtype == torch.float32
    fp32_logits = x.detach().float() @ layer.router.weight.detach().T
    torch.testing.assert_close(decision.logits_TE, fp32_logits, rtol=1e-6, atol=1e-6)
    assert (bf16_logits.float() - fp32_logits).abs().max() > 1e-3
    assert out.output.dtype == in_dtype and out.output.shape == x.shape
    assert out.aux_loss.dtype == torch.float32
    # Same decisions as without autocast, and the output within bf16 rounding of fp32.
    reference = layer(x.detach().float())
    assert torch.equal(decision.kept_TE, layer.route(x.detach().float()).kept_TE)
    torch.testing.assert_close(out.output.float(), reference.output, rtol=3e-2, atol=3e-2)
    out.output.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_output_does_not_depend_on_grad_mode(backend: str) -> None:
    """Training and inference forwards compute the same thing: under autocast the experts run
    in autocast's dtype whether or not a gradient is being recorded."""
    layer = make_layer(backend=backend, **CFG)
    x = _x(4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            inference = layer(x).output
        training = layer(x.clone().requires_grad_(True)).output
    torch.testing.assert_close(training.detach(), inference, rtol=1e-6, atol=1e-6)
    # And it really is the bf16 computation, not the fp32 one.
    assert (inference - layer(x).output).abs().max() > 1e-5
