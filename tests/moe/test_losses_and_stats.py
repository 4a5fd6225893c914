"""The balancing loss (E * sum_e f_e P_e), the z-loss, the router entropy and the statistics,
against independent computations; and the zero-token call."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import oracle
from helpers.moe import CPU_BACKENDS, make_layer, params64, run_oracle
from xmoe.moe import MoEConfig, MoELayer, RoutingSummary, load_balancing_loss, router_entropy, router_z_loss


@pytest.mark.parametrize("rule", ["threshold", "topk"])
@pytest.mark.parametrize("num_experts", [1, 3, 8])
def test_aux_loss_and_its_gradient_equal_oracle(rule: str, num_experts: int) -> None:
    layer = make_layer(seed=num_experts, router=rule, num_experts=num_experts, top_k=1)
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(11))
    P = params64(layer)
    _, probs64, _, _ = run_oracle(layer, x, P)
    # f_e counts each token's top-1: make sure no top-1 is a near-tie that fp32 could flip.
    for row in probs64.detach().tolist():
        top = sorted(row, reverse=True)
        assert len(top) == 1 or top[0] - top[1] > 1e-5
    expected = oracle.balancing_loss(probs64)

    out = layer(x)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.shape == ()
    torch.testing.assert_close(out.aux_loss.double(), expected.detach(), rtol=1e-6, atol=1e-6)

    out.aux_loss.backward()  # the gradient reaches the router through P_e only
    expected.backward()
    torch.testing.assert_close(layer.router.weight.grad.double(), P.router.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in layer.experts.parameters())


def test_aux_loss_is_one_at_perfect_balance() -> None:
    # Circulant rows: token t's top-1 is expert t (f_e = 1/E), every column averages 1/E.
    row = torch.tensor([0.4, 0.3, 0.2, 0.1])
    probs = torch.stack([row.roll(t) for t in range(4)] * 3)
    assert probs.argmax(dim=-1).tolist() == [0, 1, 2, 3] * 3
    torch.testing.assert_close(load_balancing_loss(probs), torch.tensor(1.0))
    # Uniform probabilities (a zero router): every top-1 is expert 0 (lowest index), P_e = 1/E,
    # so E * 1 * (1/E) = 1 as well.
    layer = make_layer(num_experts=4)
    with torch.no_grad():
        layer.router.weight.zero_()
    torch.testing.assert_close(layer(torch.randn(10, 8)).aux_loss, torch.tensor(1.0))


def test_aux_loss_is_E_at_total_collapse() -> None:
    probs = torch.zeros(5, 4)
    probs[:, 2] = 1.0  # every token sends everything to expert 2: f_2 = P_2 = 1
    torch.testing.assert_close(load_balancing_loss(probs), torch.tensor(4.0))


def test_z_loss_equals_hand_computation() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))
    assert router_z_loss(torch.empty(0, 3)) == 0


def entropy64(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """Mean router entropy, token by token and expert by expert, in float64."""
    total = 0.0
    for x_D in x_TD.double():
        z = [sum(x_D[d] * w_ED[e, d] for d in range(x_D.shape[0])) for e in range(w_ED.shape[0])]
        norm = sum(torch.exp(z_e) for z_e in z)
        total = total - sum((torch.exp(z_e) / norm) * torch.log(torch.exp(z_e) / norm) for z_e in z)
    return total / x_TD.shape[0]


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_layer_entropy_loss_and_its_gradient_equal_float64_reference(scale: float) -> None:
    layer = MoELayer(MoEConfig(model_dim=6, num_experts=5, expert_dim=4))
    with torch.no_grad():
        layer.router.weight.mul_(scale)  # nearly uniform, and sharp
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    w64 = layer.router.weight.detach().double().requires_grad_()
    expected = entropy64(x, w64)

    out = layer(x)
    assert out.entropy_loss.dtype == torch.float32 and out.entropy_loss.shape == ()
    torch.testing.assert_close(out.entropy_loss.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    out.entropy_loss.backward()
    expected.backward()
    torch.testing.assert_close(layer.router.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in layer.experts.parameters())  # a loss on the router alone


def test_router_entropy_bounds_and_underflow() -> None:
    uniform = torch.zeros(4, 8)
    torch.testing.assert_close(router_entropy(uniform), torch.tensor(math.log(8)))
    one_hot = torch.tensor([[0.0, -1e4, -1e4]], requires_grad=True)  # p underflows to exactly 0
    value = router_entropy(one_hot)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(one_hot.grad).all()
    assert router_entropy(torch.empty(0, 3)) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8)])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_zero_tokens(backend: str, shape: tuple, capacity_factor) -> None:
    layer = make_layer(backend=backend, capacity_factor=capacity_factor)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    assert out.output.shape == shape and out.output.dtype == x.dtype
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.entropy_loss.item() == 0.0
    stats = out.stats
    assert stats.num_tokens == 0
    assert stats.capacity == (None if capacity_factor is None else 0)
    assert stats.tokens_per_expert.tolist() == [0] * 8
    assert int(stats.dropped_pairs) == 0
    assert float(stats.kept_per_token) == 0.0 and float(stats.wanted_per_token) == 0.0
    assert stats.wanted_histogram.tolist() == [0] * 9
    json.dumps(stats.to_dict())  # loggable even when empty
    (out.output.sum() + out.aux_loss).backward()  # an empty batch must not break training
    assert x.grad.shape == shape


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [False, True])
def test_losses_are_computed_only_when_read_and_then_exactly(training: bool) -> None:
    """A call whose losses nobody reads (evaluation, decoding) runs none of their ops (the
    z-loss's logsumexp, the entropy's log_softmax: no router step has them); reading them gives
    the pure functions' values on the call's router outputs, once, with their gradient."""
    layer = make_layer(threshold=0.8).train(training)
    x = torch.randn(6, 8)
    with _OpNames() as call:
        out = layer(x)
    assert not {"logsumexp", "_log_softmax"} & set(call.names), call.names
    with _OpNames() as reading:
        losses = (out.aux_loss, out.z_loss, out.entropy_loss)
    assert {"logsumexp", "_log_softmax", "argmax"} <= set(reading.names)
    assert out.aux_loss is losses[0]  # computed once, then kept
    decision = layer.route(x)
    expected = (load_balancing_loss(decision.probs_TE), router_z_loss(decision.logits_TE),
                router_entropy(decision.logits_TE))
    for got, want in zip(losses, expected):
        torch.testing.assert_close(got, want)
    sum(losses).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_stats_worked_example() -> None:
    """A dominant expert under capacity: every token wants expert 0 alone, 4 slots keep 4."""
    layer = make_layer(threshold=0.5, capacity_factor=1.0, min_capacity=4)
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 2.0
    x = torch.randn(12, 8)
    x[:, 0] = 3.0
    stats = layer(x).stats
    # C = min(12, max(ceil(1.0 * 12 / 8), 4)) = 4.
    assert stats.capacity == 4
    assert stats.tokens_per_expert.tolist() == [4, 0, 0, 0, 0, 0, 0, 0]
    assert float(stats.wanted_per_token) == 1.0
    torch.testing.assert_close(stats.kept_per_token, torch.tensor(4 / 12))
    assert int(stats.dropped_pairs) == 8
    torch.testing.assert_close(stats.dropped_token_fraction, torch.tensor(8 / 12))
    assert stats.wanted_histogram.tolist() == [0, 12] + [0] * 7
    assert stats.kept_histogram.tolist() == [8, 4] + [0] * 7
    # Expert FLOPs: 2 matrices of 8 x 16, 2 FLOPs per multiply-add, 4 pairs over 12 tokens;
    # the top-2 layer of the same experts would do 2 pairs per token.
    torch.testing.assert_close(stats.expert_flops_per_token, torch.tensor(2 * 8 * 16 * 2 * 4 / 12))
    assert stats.topk_flops_per_token == 2 * (2 * 8 * 16 * 2)
    torch.testing.assert_close(stats.flops_ratio, torch.tensor((4 / 12) / 2))
    d = stats.to_dict()
    assert d["tokens_per_expert"] == [4, 0, 0, 0, 0, 0, 0, 0] and d["capacity"] == 4
    json.dumps(d)


def test_routing_summary_adds_calls_like_one_count_over_all_tokens() -> None:
    """Summed over calls (with capacity dropping pairs, and an empty call), the summary equals
    counts taken directly from each call's decision masks."""
    layer = make_layer(seed=3, threshold=0.8, capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    summary = RoutingSummary()
    kept_total = wanted_total = tokens = 0
    histogram, per_expert = torch.zeros(9, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    for seed, num_tokens in ((1, 20), (2, 0), (3, 13)):
        x = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            summary.add(layer(x).stats)
            decision = layer.route(x)
        kept_T = decision.kept_TE.sum(-1)
        kept_total += int(kept_T.sum())
        wanted_total += int(decision.wanted_TE.sum())
        tokens += num_tokens
        histogram += torch.bincount(kept_T, minlength=9)
        per_expert += decision.kept_TE.sum(0)
    d = summary.to_dict()
    assert wanted_total > kept_total  # capacity dropped some pairs
    assert summary.tokens == tokens == 33
    assert d["experts_per_token"] == pytest.approx(kept_total / tokens)
    assert d["wanted_per_token"] == pytest.approx(wanted_total / tokens)
    assert d["dropped_pairs"] == wanted_total - kept_total
    assert d["experts_histogram"] == histogram.tolist()
    assert d["tokens_per_expert"] == per_expert.tolist()
    assert all(0 < q <= 1 for q in d["top1_quartiles"])
    assert RoutingSummary().to_dict()["experts_histogram"] == []  # nothing added: no crash
