"""The compute-budget controller (MoEConfig.target_experts, xmoe.moe.dial): checked against a
float64 simulation of its equations written out here, on synthetic routers, across ranks, and
through the model's life (eval, dtype casts, state dicts)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import distributed as workers
from helpers.moe import make_layer
from xmoe.moe import MoEConfig
from xmoe.moe.dial import K_I, K_P, U_MAX, budget_dials, step_budgets


def simulate(t0: float, target: float, counts: list[tuple[int, int]]) -> list[float]:
    """The controller of docs/method.md, "A compute budget", in plain float64 Python: t after
    each step with (wanted pairs, tokens)."""
    u, e_prev, ts = math.log(t0 / (1 - t0)), 0.0, []
    for pairs, tokens in counts:
        e = math.log(target / (pairs / tokens))
        u = min(U_MAX, max(-U_MAX, u + K_P * (e - e_prev) + K_I * e))
        e_prev = e
        ts.append(1 / (1 + math.exp(-u)))
    return ts


def budget_layer(target: float, sharpness: float = 1.0, seed: int = 0, **fields):
    layer = make_layer(seed, num_experts=16, target_experts=target, threshold=0.9, **fields)
    with torch.no_grad():
        layer.router.weight.mul_(sharpness)
    return layer.train()


def train_steps(layer, steps: int, tokens: int = 256, seed: int = 1):
    """Route ``steps`` fresh batches in training mode, one controller step after each; returns
    (t before each step, wanted experts per token of each step)."""
    gen = torch.Generator().manual_seed(seed)
    ts, means = [], []
    for _ in range(steps):
        ts.append(layer.threshold)
        x = torch.randn(tokens, layer.cfg.model_dim, generator=gen)
        with torch.no_grad():
            means.append(float(layer(x).stats.wanted_per_token))
        step_budgets(layer)
    return ts, means


def test_the_controller_follows_its_equations_in_float64():
    """Steps of one or two calls (gradient accumulation), on a layer whose capacity drops pairs:
    the controller counts the pairs the rule wanted, before capacity."""
    layer = budget_layer(target=3.0, capacity_factor=1.0, min_capacity=1)
    gen = torch.Generator().manual_seed(0)
    counts, dropped = [], 0
    for step in range(12):
        pairs = tokens = 0
        for _ in range(1 + step % 2):
            x = torch.randn(int(torch.randint(1, 64, (1,), generator=gen)), 8, generator=gen)
            with torch.no_grad():
                stats = layer(x).stats
            histogram = stats.wanted_histogram  # tokens that wanted k experts, k = 0..E
            pairs += int((histogram * torch.arange(len(histogram))).sum())
            tokens += x.shape[0]
            dropped += int(stats.dropped_pairs)
        counts.append((pairs, tokens))
        step_budgets(layer)
        assert layer.threshold == pytest.approx(simulate(0.9, 3.0, counts)[-1], rel=1e-12, abs=1e-15)
    assert dropped > 0  # kept and wanted pairs differ: counting kept pairs would fail above


@pytest.mark.parametrize("target", [1.5, 2.0, 4.0])
@pytest.mark.parametrize("sharpness", [0.5, 3.0, 10.0], ids=["soft", "sharp", "very-sharp"])
def test_the_mean_reaches_the_budget_in_20_steps_and_stays_within_a_band(target, sharpness):
    """Synthetic routers (fixed gate, fresh Gaussian tokens each step): within 20 steps every
    step's mean is within 25% of the budget, and over steps 20-80 the average is within 3%."""
    layer = budget_layer(target, sharpness)
    ts, means = train_steps(layer, 80)
    if sharpness < 5:
        assert abs(means[0] - target) > 0.25 * target  # the starting t = 0.9 is far from the budget
    settled = means[20:]
    assert all(abs(m / target - 1) < 0.25 for m in settled), settled
    assert sum(settled) / len(settled) == pytest.approx(target, rel=0.03)
    assert all(0 < t < 1 for t in ts)


def test_t_stays_inside_the_open_interval_at_the_extreme_budgets():
    """Every one of 16 experts, under a sharp router, needs t above 1 - (the least probability),
    out of reach: t rises to the logit's clamp and stops there, below 1. One expert per token
    is reached by any t at most the least top-1 probability: t settles above 0."""
    ts, means = train_steps(budget_layer(16.0, sharpness=10.0), 80, tokens=64)
    assert all(0 < t < 1 for t in ts)
    assert ts[-1] == 1 / (1 + math.exp(-U_MAX)) and means[-1] < 16
    ts, means = train_steps(budget_layer(1.0, sharpness=0.2), 60, tokens=64)
    assert all(0 < t < 1 for t in ts) and ts[-1] > 1 / (1 + math.exp(U_MAX))
    assert means[-5:] == [1.0] * 5


def test_evaluation_freezes_t_and_the_dial_still_turns_it():
    layer = budget_layer(2.0)
    train_steps(layer, 10)
    trained = layer.threshold
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(64, 8))
    step_budgets(layer)  # nothing was counted in eval mode: nothing moves
    assert layer.threshold == trained
    layer.set_threshold(0.5)
    assert layer.threshold == 0.5
    with pytest.raises(ValueError, match="threshold"):
        layer.set_threshold(0.0)


def test_max_experts_still_caps_a_budgeted_router():
    layer = budget_layer(3.0, sharpness=0.2, max_experts=3)
    _, means = train_steps(layer, 30)
    layer.eval()
    with torch.no_grad():
        histogram = layer(torch.randn(256, 8)).stats.kept_histogram
    assert histogram[4:].sum() == 0 and histogram[3] > 0


def test_t_is_saved_with_the_weights_in_float64_and_survives_half_precision():
    layer = budget_layer(2.0)
    train_steps(layer, 7)
    t = layer.threshold
    state = layer.state_dict()
    assert state["router.dial.threshold"].dtype == torch.float64 and float(state["router.dial.threshold"]) == t
    assert "router.dial.last_error" in state and "router.dial.step_pairs" not in state  # counts are per step
    fresh = budget_layer(2.0, seed=5)
    fresh.load_state_dict(state)
    assert fresh.threshold == t
    fresh.to(torch.bfloat16)
    assert fresh.router.dial.threshold.dtype == torch.float64 and fresh.threshold == t
    # A fixed t is not state: the state dict of an unbudgeted layer has no dial entry.
    assert not any("dial" in k for k in make_layer().state_dict())


def test_config_errors_name_the_field():
    for fields, words in [
        (dict(router="topk", target_experts=2.0), "top-k router"),
        (dict(target_experts=0.5), "1..8"),
        (dict(target_experts=9.0), "1..8"),
        (dict(target_experts=3.0, max_experts=2), "1..2"),
    ]:
        with pytest.raises(ValueError, match="target_experts|threshold") as err:
            MoEConfig(model_dim=8, num_experts=8, expert_dim=16, **fields)
        assert words in str(err.value)


def _two_ranks_route(rank: int, world_size: int, out: str) -> None:
    from xmoe.distributed import Layout, Parallel

    parallel = Parallel(Layout(world_size=world_size, ep_size=1))
    layer = budget_layer(2.0)
    ts = []
    for step, x in enumerate(_batches()):
        with torch.no_grad():
            layer(x.chunk(world_size)[rank])  # each rank routes its share of the step's tokens
        step_budgets(layer, parallel.sum_tensor)
        ts.append(layer.threshold)
    torch.save(ts, f"{out}/rank{rank}.pt")


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(n, 8, generator=gen) for n in (64, 30, 96, 10, 50)]


def test_ranks_set_the_same_t_as_one_process_routing_every_token(tmp_path):
    workers.spawn(_two_ranks_route, 2, str(tmp_path))
    one = budget_layer(2.0)
    expected = []
    for x in _batches():
        with torch.no_grad():
            one(x)
        step_budgets(one)
        expected.append(one.threshold)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1] == expected  # exactly: the counts are integers, summed once


def test_budget_dials_lists_only_controlled_layers():
    from torch import nn

    model = nn.Sequential(budget_layer(2.0), make_layer(), budget_layer(3.0))
    assert [d.target_experts for d in budget_dials(model)] == [2.0, 3.0]


def test_static_mode_steers_t_like_the_dynamic_layer():
    """Static mode (no host read) counts and updates on the device: the same t, step by step."""
    static = budget_layer(2.0, max_experts=8, static_shapes=True)
    dynamic = budget_layer(2.0, max_experts=8)
    dynamic.load_state_dict(static.state_dict())
    for layer in (static, dynamic):
        layer.ts, _ = train_steps(layer, 8, tokens=32)
    assert static.ts == dynamic.ts and len(set(static.ts)) == 8
