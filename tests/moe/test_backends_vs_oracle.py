"""Every backend against the float64 per-token oracle: routing decisions, outputs, and the
gradients of the input, the router weight and every expert weight and bias.

The oracle decides on its own float64 probabilities (computed from the layer's router weight);
each case asserts that its decisions are further from a boundary than fp32 rounding
(``routing.margin > MARGIN``), except exact ties, which both break by the lowest index.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from helpers import oracle
from helpers.moe import CPU_BACKENDS, MARGIN, layer_params, make_layer, params64, run_oracle
from xmoe.moe import MoELayer
from xmoe.moe.backends import fused

T = 24  # tokens per case; the layers are D=8, E=8, F=16


def _x(seed: int, num_tokens: int = T, dim: int = 8) -> torch.Tensor:
    return torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(seed))


# --- inputs: each builder may reshape the layer's router weight, then returns x [T, D] -------


def peaked(layer: MoELayer) -> torch.Tensor:
    """Random tokens; router weights scaled up so tokens want 2-5 of the 8 experts."""
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    return _x(1)


def dominant(layer: MoELayer) -> torch.Tensor:
    """Expert 0 takes almost all the mass of every token: x[:, 0] = 3 and only expert 0 reads it."""
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 2.0
    x = _x(2)
    x[:, 0] = 3.0
    return x


def tied(layer: MoELayer) -> torch.Tensor:
    """Experts 1 and 2 have the same router row (equal p for every token, the favourites), and the
    second half of the batch repeats the first (equal priorities at a full expert)."""
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[1, 0] = 1.5
        layer.router.weight[2] = layer.router.weight[1]
    x = _x(3)
    x[:, 0] = 2.0
    x[T // 2 :] = x[: T // 2]
    return x


# --- what a case must really exhibit, checked on the oracle's decisions -----------------------


def overflow(r: oracle.Routing, E: int) -> bool:
    return len(r.kept) < sum(len(w) for w in r.wanted)


def idle_expert(r: oracle.Routing, E: int) -> bool:
    return len({e for _, e in r.kept}) < E


def every_expert(r: oracle.Routing, E: int) -> bool:
    return all(len(w) == E for w in r.wanted)


def one_expert(r: oracle.Routing, E: int) -> bool:
    return all(len(w) == 1 for w in r.wanted)


def several_experts(r: oracle.Routing, E: int) -> bool:
    return len({len(w) for w in r.wanted}) > 1  # a variable number of experts per token


FEATURES = dict(
    overflow=overflow,
    idle_expert=idle_expert,
    every_expert=every_expert,
    one_expert=one_expert,
    several_experts=several_experts,
)


@dataclass(frozen=True)
class Case:
    id: str
    cfg: dict
    build: Callable[[MoELayer], torch.Tensor] = peaked
    training: bool = True
    shows: tuple[str, ...] = ()


CASES = [
    Case("threshold-dropless-gelu", dict(threshold=0.9), shows=("several_experts",)),
    Case(
        "threshold-capacity-gelu",
        dict(threshold=0.9, capacity_factor=1.5, min_capacity=1),
        shows=("overflow", "several_experts"),
    ),
    Case(
        "threshold-eval-capacity-relu",
        dict(threshold=0.8, eval_capacity_factor=1.0, min_capacity=2, activation="relu"),
        training=False,
        shows=("overflow",),
    ),
    Case("topk2-dropless-relu", dict(router="topk", top_k=2, activation="relu")),
    Case(
        "topk2-capacity-swiglu",
        dict(router="topk", top_k=2, capacity_factor=1.0, min_capacity=1, activation="swiglu"),
        shows=("overflow",),
    ),
    Case(
        "top1-capacity-nobias",
        dict(router="topk", top_k=1, capacity_factor=1.0, min_capacity=0, expert_bias=False),
        shows=("overflow",),
    ),
    Case(
        "t1-every-expert-swiglu-nobias",
        dict(threshold=1.0, activation="swiglu", expert_bias=False),
        shows=("every_expert",),
    ),
    Case(
        "t1-every-expert-capacity",
        dict(threshold=1.0, capacity_factor=2.0, min_capacity=1),
        shows=("every_expert", "overflow"),
    ),
    Case(
        "dominant-capacity",
        dict(threshold=0.5, capacity_factor=1.0, min_capacity=4),
        build=dominant,
        shows=("one_expert", "overflow", "idle_expert"),
    ),
    Case("dominant-dropless-relu", dict(threshold=0.9, activation="relu"), build=dominant, shows=("idle_expert",)),
    Case(
        "ties-threshold-capacity",
        dict(threshold=0.5, capacity_factor=1.0, min_capacity=1),
        build=tied,
        shows=("overflow",),
    ),
    Case(
        "ties-top1-capacity-swiglu",
        dict(router="topk", top_k=1, capacity_factor=1.0, min_capacity=1, activation="swiglu"),
        build=tied,
        shows=("overflow", "idle_expert"),
    ),
    Case(
        "renormalize-topk3-capacity",
        dict(router="topk", top_k=3, renormalize=True, capacity_factor=1.0, min_capacity=1),
        shows=("overflow",),
    ),
    Case(
        "renormalize-threshold-relu-nobias",
        dict(threshold=0.6, renormalize=True, activation="relu", expert_bias=False),
        shows=("several_experts",),
    ),
    Case(
        "ones-threshold-capacity-gelu_tanh",
        dict(threshold=0.8, combine="ones", activation="gelu_tanh", capacity_factor=1.0, min_capacity=1),
        shows=("overflow", "several_experts"),
    ),
    Case("ones-all-experts-swiglu", dict(threshold=1.0, combine="ones", activation="swiglu"), shows=("every_expert",)),
    # max_experts: a cap on the threshold rule (a deviation from the paper, for static shapes).
    Case("threshold-max2-dropless", dict(threshold=0.9, max_experts=2), shows=("several_experts",)),
    Case(
        "threshold-max3-capacity-swiglu",
        dict(threshold=0.95, max_experts=3, capacity_factor=1.0, min_capacity=1, activation="swiglu"),
        shows=("overflow", "several_experts"),
    ),
]


def _setup(case: Case, backend: str):
    layer = make_layer(backend=backend, **case.cfg)
    layer.train(case.training)
    x = case.build(layer)
    return layer, x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_matches_oracle(case: Case, backend: str) -> None:
    _check_against_oracle(case, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_matches_oracle_on_cuda(case: Case, backend: str) -> None:
    """The same cases on a GPU, where routing and the backends take their CUDA paths."""
    _check_against_oracle(case, backend, device=torch.device("cuda"))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fused_chunks_match_oracle(case: Case, rows: int, monkeypatch) -> None:
    """The fused backend walks the experts in runs holding about CHUNK_BYTES of rows (at these
    sizes, one run of all experts); tiny budgets give runs of one expert each, and runs of
    several experts that end mid-batch."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", rows * 8 * 4)  # rows of D=8 fp32
    _check_against_oracle(case, "fused")


def _check_against_oracle(case: Case, backend: str, device: torch.device | None = None) -> None:
    layer, x = _setup(case, backend)
    E = layer.cfg.num_experts
    P = params64(layer)
    x64 = x.double().requires_grad_(True)
    y64, _, _, routing = run_oracle(layer, x64, P)

    # The case really is what it claims, and far enough from any boundary to be decided alike.
    assert routing.margin > MARGIN
    for feature in case.shows:
        assert FEATURES[feature](routing, E), f"case {case.id} does not show {feature}"
    if device is not None:
        layer, x = layer.to(device), x.to(device)

    # The decisions.
    decision = layer.route(x)
    assert torch.equal(decision.wanted_TE.cpu(), routing.wanted_mask(E))
    assert torch.equal(decision.kept_TE.cpu(), routing.kept_mask(E))
    assert decision.capacity == routing.capacity

    # The output.
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    assert out.output.shape == x.shape and out.output.dtype == x.dtype
    torch.testing.assert_close(out.output.double().cpu(), y64.detach(), rtol=1e-5, atol=1e-5)

    # The gradients, under a random (not all-ones) upstream gradient.
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    (out.output * g.to(x.device)).sum().backward()
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(xg.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-5)
    for name, param in layer_params(layer).items():
        if name == "router" and layer.cfg.combine == "ones":
            assert param.grad is None  # unit weights: the output does not depend on the router's p
            continue
        assert param.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(param.grad.double().cpu(), P.named()[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backends_agree(case: Case) -> None:
    """grouped_mm and loop compute the same thing on the same weights (up to fp32 rounding)."""
    loop, x = _setup(case, "loop")
    grouped = copy.deepcopy(loop)
    grouped.backend = "grouped_mm"
    torch.testing.assert_close(grouped(x).output, loop(x).output, rtol=1e-5, atol=1e-6)


def test_router_gradient_flows_only_through_combine_weights() -> None:
    """With the experts' outputs fixed, d y / d W_g is d (sum_e p_e FFN_e) / d W_g with the
    selection held constant: the oracle's autograd computes exactly that, and a layer whose
    experts are all identical and bias-only makes it checkable by hand: y = (sum_kept p) * b2."""
    layer = make_layer(threshold=0.7, init="identical", backend="loop")
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
        layer.experts.w2.zero_()  # FFN_e(x) = b2 for every e: y_t = (sum of kept p_t) * b2
    x = _x(4)
    out = layer(x)
    decision = layer.route(x)
    kept_mass = decision.weights_TE.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(out.output, kept_mass * layer.experts.b2[0], rtol=1e-5, atol=1e-6)

    out.output.sum().backward()
    # By hand: d/dW of sum_t c * sum_{e kept(t)} p_te with c = sum(b2), p = softmax(W x).
    c = layer.experts.b2[0].sum().item()
    p = decision.probs_TE.double()
    kept = decision.kept_TE.double()
    # d p_te / d logit_tj = p_te (delta_ej - p_tj)
    dlogits = c * (p * kept - p * (p * kept).sum(dim=-1, keepdim=True))
    expected = dlogits.T @ x.double()
    torch.testing.assert_close(layer.router.weight.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_float64_layer_matches_oracle() -> None:
    """layer.double() runs the experts in float64 (routing stays fp32 by design)."""
    layer = make_layer(threshold=0.9, capacity_factor=1.5, min_capacity=1, backend="loop").double()
    x = peaked(layer).double()
    y64, _, _, routing = run_oracle(layer, x)
    assert routing.margin > MARGIN and overflow(routing, 8)
    out = layer(x)
    assert out.output.dtype == torch.float64
    assert layer.route(x).probs_TE.dtype == torch.float32
    torch.testing.assert_close(out.output, y64.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_inference_calls_of_a_few_tokens_match_oracle(case: Case, tokens: int) -> None:
    """Decoding: eval mode, no grad, a few tokens, ``auto`` (the small-T path, decided and
    planned on the host where it can be). Output and decisions (the masks are built from the
    host decision when read) against the oracle; the host decides every call it can: all but a
    renormalized rule and an expert over capacity (ties included: the "ties" cases)."""
    layer, x = _setup(case, "auto")
    layer.eval()
    x = x[:tokens]
    E = layer.cfg.num_experts
    y64, _, _, routing = run_oracle(layer, x)
    assert routing.margin > MARGIN
    with torch.no_grad():
        out = layer(x)
    assert out.backend == "direct"
    torch.testing.assert_close(out.output.double(), y64, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.decision.kept_TE, routing.kept_mask(E))
    assert torch.equal(out.decision.wanted_TE, routing.wanted_mask(E))
    torch.testing.assert_close(out.decision.weights_TE, layer.route(x).weights_TE, rtol=0, atol=0)
    assert (out.decision.host is not None) == (not layer.cfg.renormalize and not overflow(routing, E))
