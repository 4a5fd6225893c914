"""The small-T path at inference (decoding, decode.py): a call of a few tokens is decided and
planned on the host and runs each kept expert on views of its weights that the experts keep
between calls (``Experts.per_expert``). These views must follow every way a weight can change,
and a call must stay a handful of ops (the point of the path: benchmarks/README.md, "Decoding")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.moe import make_layer, run_oracle


def _check(layer, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """One decoding call against the oracle on the layer's weights of the moment."""
    with torch.no_grad():
        out = layer(x)
    assert out.decision.host is not None  # the host path ran
    torch.testing.assert_close(out.output.double(), run_oracle(layer, x)[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_decoding_follows_every_kind_of_weight_change(activation: str) -> None:
    layer = make_layer(router="topk", top_k=3, activation=activation).eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    _check(layer, x)
    experts = layer.experts
    with torch.no_grad():
        experts.w2.mul_(2.0)  # in place: the views share the storage
        _check(layer, x)
        experts.w1.data = experts.w1.data * 0.5  # new storage behind the same parameter
        _check(layer, x)
        layer.load_state_dict(make_layer(seed=3, router="topk", top_k=3, activation=activation).state_dict())
        _check(layer, x)
        experts.b2 = nn.Parameter(torch.randn_like(experts.b2))  # a new parameter
        _check(layer, x)
        layer.router.weight.mul_(-1.0)  # the router's transposed view (Router.weight_t) too
        _check(layer, x)
        layer.router.weight.data = torch.randn_like(layer.router.weight)
        _check(layer, x)
        layer.router.weight = nn.Parameter(torch.randn_like(layer.router.weight))
        _check(layer, x)
    layer.double()  # .to() and friends make new parameters
    _check(layer, x.double())
    _check(copy.deepcopy(layer), x.double())


def test_decoding_follows_a_weight_cut_to_fewer_experts() -> None:
    """A weight replaced by a slice of itself (the first 4 of 8 experts) starts at the old
    address: the kept views (the gate's transpose, the experts' views) must not serve the old
    shape."""
    layer = make_layer(router="topk", top_k=2).eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    _check(layer, x)
    with torch.no_grad():
        layer.router.weight = nn.Parameter(layer.router.weight[:4])
        for name in ("w1", "b1", "w2", "b2"):
            setattr(layer.experts, name, nn.Parameter(getattr(layer.experts, name)[:4]))
        assert layer(x).decision.probs_TE.shape == (2, 4)
    _check(layer, x)


def test_decoding_under_autocast_follows_the_weights() -> None:
    """Under bf16 autocast the views are of the cached bf16 cast, which a weight update renews."""
    layer = make_layer(router="topk", top_k=2, model_dim=16).eval()
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check(layer, x, rtol=2e-2, atol=2e-2)
        with torch.no_grad():
            layer.experts.w2.mul_(-1.0)
        _check(layer, x, rtol=2e-2, atol=2e-2)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [1, 2, 8])
def test_a_decoding_call_is_a_handful_of_ops(k: int) -> None:
    """One token, top-k: the router's GEMM (on its weight's transpose, kept between calls) and
    softmax (the probabilities are read to the host, where the rule decides), then per expert its
    up GEMM and activation and a down GEMM that adds into the output with the weight as its alpha
    (the first expert's GEMM makes the output, the others add their bias apart), and the reshapes
    in and out. 43 ops for top-1 before the host path, 7 now."""
    layer = make_layer(router="topk", top_k=k, num_experts=16).eval()
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        layer(x)  # the first call makes the views
        with _CountOps() as counted:
            layer(x)
    up_and_down = ["addmm.default", "gelu.default"]
    expected = ["view.default", "mm.default", "_softmax.default"]
    expected += up_and_down + ["addmm.default"] + (up_and_down + ["addmm_.default", "add_.Tensor"]) * (k - 1)
    assert counted.ops == expected + ["view.default"]


@pytest.mark.parametrize("part", ["router", "experts"])
def test_a_hooked_router_or_experts_sees_every_decoding_call(part: str) -> None:
    """Decoding does not call the router and the experts as modules; where one has a forward
    hook, the call takes the general path, which does, and the hook fires. The same output."""
    layer = make_layer(router="topk", top_k=2).eval()
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unhooked = layer(x)
        calls = []
        handle = getattr(layer, part).register_forward_hook(lambda module, args, out: calls.append(out))
        hooked = layer(x)
        handle.remove()
    assert unhooked.decision.host is not None and len(calls) == 1
    torch.testing.assert_close(hooked.output, unhooked.output, rtol=1e-6, atol=1e-6)
    _check(layer, x)
