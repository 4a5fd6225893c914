"""Property tests (hypothesis, derandomized): the routing rule's invariants on arbitrary rows,
the bookkeeping of a whole layer call, and token-permutation equivariance without capacity."""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from helpers import oracle
from helpers.moe import CPU_BACKENDS, PROPERTY, make_layer, oracle_routing
from unittest import mock

from xmoe.moe import apply_capacity, threshold_mask, topk_mask
from xmoe.moe import router as router_module
from xmoe.moe.decode import HostPlan

# A probability: mostly arbitrary, sometimes one of a few exact values so that ties happen.
_weight = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.125, 0.25, 0.5]))


@st.composite
def prob_rows(draw, max_tokens: int = 8, max_experts: int = 10) -> torch.Tensor:
    """[T, E] fp32 rows that sum to one (an all-zero draw becomes uniform)."""
    E = draw(st.integers(1, max_experts))
    T = draw(st.integers(1, max_tokens))
    raw = torch.tensor(draw(st.lists(st.lists(_weight, min_size=E, max_size=E), min_size=T, max_size=T)))
    raw[raw.sum(dim=-1) == 0] = 1.0
    return (raw / raw.sum(dim=-1, keepdim=True)).float()


def _prefix_sums(p: list[float], order: list[int]) -> list[float]:
    sums, acc = [], 0.0
    for e in order:
        acc += p[e]
        sums.append(acc)
    return sums


@PROPERTY
@given(probs=prob_rows(), threshold=st.floats(0.01, 1.5))
def test_threshold_picks_minimal_prefix_reaching_t(probs: torch.Tensor, threshold: float) -> None:
    T, E = probs.shape
    rows = probs.double().tolist()  # the fp32 values exactly; the library sums them in float64 too
    # Keep clear of sums that land within float64 rounding of t (exact hits are worked examples).
    assume(all(abs(s - threshold) > 1e-12 for p in rows for s in _prefix_sums(p, oracle.experts_by_rank(p))))
    wanted_TE, order_TE = threshold_mask(probs, threshold)
    for t, p in enumerate(rows):
        order = oracle.experts_by_rank(p)
        chosen = set(torch.nonzero(wanted_TE[t]).flatten().tolist())
        k = len(chosen)
        assert 1 <= k <= E
        assert chosen == set(order[:k]), "not a prefix of the experts sorted by (-p, index)"
        assert order_TE[t].tolist() == order
        sums = _prefix_sums(p, order)
        if threshold >= 1:
            assert k == E
        else:
            assert k == E or sums[k - 1] >= threshold, "the prefix does not reach t"
            assert k == 1 or sums[k - 2] < threshold, "a shorter prefix already reached t"
    # A larger threshold never takes experts away.
    wanted_more, _ = threshold_mask(probs, threshold + 0.05)
    assert not (wanted_TE & ~wanted_more).any()


@PROPERTY
@given(probs=prob_rows(), data=st.data())
def test_topk_picks_first_k(probs: torch.Tensor, data) -> None:
    T, E = probs.shape
    k = data.draw(st.integers(1, E))
    wanted_TE, _ = topk_mask(probs, k)
    for t, p in enumerate(probs.double().tolist()):
        assert set(torch.nonzero(wanted_TE[t]).flatten().tolist()) == set(oracle.topk_choice(p, k))


@PROPERTY
@given(probs=prob_rows(max_tokens=12, max_experts=6), data=st.data())
def test_capacity_keeps_highest_priority(probs: torch.Tensor, data) -> None:
    T, E = probs.shape
    if data.draw(st.booleans(), label="threshold rule"):
        wanted_TE, order_TE = threshold_mask(probs, data.draw(st.floats(0.05, 1.0), label="t"))
    else:
        wanted_TE, order_TE = topk_mask(probs, data.draw(st.integers(1, E), label="k"))
    slots = data.draw(st.integers(1, T), label="slots")
    kept_TE = apply_capacity(probs, wanted_TE, order_TE, slots)
    assert torch.equal(apply_capacity(probs, wanted_TE, None, slots), kept_TE)  # sorts by itself

    rows = probs.double().tolist()
    wanted = [[e for e in oracle.experts_by_rank(p) if wanted_TE[t, e]] for t, p in enumerate(rows)]
    # Exactly the oracle's choice: (K - r) + p is computed from the same fp32 p in float64 on
    # both sides, so there is no rounding difference to keep away from.
    expected = oracle.keep_pairs(rows, wanted, E, slots)
    assert {tuple(pair) for pair in torch.nonzero(kept_TE).tolist()} == expected

    assert not (kept_TE & ~wanted_TE).any()
    for e in range(E):
        assert kept_TE[:, e].sum() == min(slots, int(wanted_TE[:, e].sum()))
        kept = [t for t in range(T) if kept_TE[t, e]]
        dropped = [t for t in range(T) if wanted_TE[t, e] and not kept_TE[t, e]]
        for a in kept:
            for b in dropped:
                pa, pb = oracle.priority(wanted, rows, a, e), oracle.priority(wanted, rows, b, e)
                assert pa > pb or (pa == pb and a < b), f"expert {e}: kept {a} below dropped {b}"


@st.composite
def layer_setups(draw):
    E = draw(st.integers(1, 6), label="experts")
    rule = draw(st.sampled_from(["threshold", "topk"]), label="router")
    factor = draw(st.one_of(st.none(), st.floats(0.25, 3.0)), label="capacity_factor")
    training = draw(st.booleans(), label="training")
    cfg = dict(
        model_dim=4,
        expert_dim=4,
        num_experts=E,
        router=rule,
        threshold=draw(st.floats(0.2, 1.0), label="threshold"),
        top_k=draw(st.integers(1, E), label="top_k"),
        min_capacity=draw(st.integers(0, 5), label="min_capacity"),
        # The factor goes where this mode reads it.
        capacity_factor=factor if training else None,
        eval_capacity_factor=None if training else factor,
        activation=draw(st.sampled_from(["gelu", "relu", "swiglu"]), label="activation"),
        backend=draw(st.sampled_from(CPU_BACKENDS), label="backend"),
    )
    T = draw(st.integers(0, 20), label="tokens")
    seed = draw(st.integers(0, 2**16), label="seed")
    return cfg, training, T, seed


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's and torch's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


@PROPERTY
@given(setup=layer_setups())
def test_stats_count_kept_pairs_consistently(setup) -> None:
    cfg, training, T, seed = setup
    layer = make_layer(seed=seed, **cfg).train(training)
    x = torch.randn(T, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = layer(x)
        decision = layer.route(x)
    stats, E = out.stats, cfg["num_experts"]

    # Decisions equal the oracle's, taken on the layer's own fp32 probabilities (cast to float64):
    # random layers can sit arbitrarily close to a boundary, so the float64 softmax could differ.
    routing = oracle_routing(layer, x, from_layer_probs=True)
    assert torch.equal(decision.wanted_TE, routing.wanted_mask(E))
    assert torch.equal(decision.kept_TE, routing.kept_mask(E))

    wanted_T = [len(w) for w in routing.wanted]
    kept_T = [len(routing.kept_experts(t)) for t in range(T)]
    assert stats.num_tokens == T
    assert stats.capacity == routing.capacity == decision.capacity
    assert all(1 <= k <= E for k in wanted_T)
    num_kept = int(stats.tokens_per_expert.sum())
    assert num_kept == sum(kept_T) == int((decision.weights_TE != 0).sum())
    assert stats.tokens_per_expert.tolist() == [sum(1 for t, e in routing.kept if e == x_) for x_ in range(E)]
    if routing.capacity is not None:
        assert max(stats.tokens_per_expert.tolist(), default=0) <= routing.capacity
    assert abs(float(stats.kept_per_token) * T - sum(kept_T)) < 1e-4
    assert abs(float(stats.wanted_per_token) * T - sum(wanted_T)) < 1e-4
    assert int(stats.dropped_pairs) == sum(wanted_T) - sum(kept_T)
    assert abs(float(stats.dropped_token_fraction) * T - sum(k < w for k, w in zip(kept_T, wanted_T))) < 1e-4
    assert stats.wanted_histogram.tolist() == [wanted_T.count(k) for k in range(E + 1)]
    assert stats.kept_histogram.tolist() == [kept_T.count(k) for k in range(E + 1)]
    assert int(stats.wanted_histogram.sum()) == int(stats.kept_histogram.sum()) == T
    per_pair = 2 * 4 * 4 * (3 if cfg["activation"] == "swiglu" else 2)
    assert abs(float(stats.expert_flops_per_token) - per_pair * sum(kept_T) / max(T, 1)) < 1e-3
    assert stats.topk_flops_per_token == cfg["top_k"] * per_pair
    if T:
        top1 = decision.probs_TE.max(dim=-1).values.double().tolist()
        expected = [_quantile(top1, q) for q in (0.25, 0.5, 0.75)]
        torch.testing.assert_close(stats.top1_quartiles.double(), torch.tensor(expected, dtype=torch.float64))


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(1, 16),
    rule=st.sampled_from(["threshold", "topk"]),
    backend=st.sampled_from(CPU_BACKENDS),
)
def test_dropless_layer_is_token_permutation_equivariant(seed: int, T: int, rule: str, backend: str) -> None:
    layer = make_layer(seed=seed, router=rule, threshold=0.8, top_k=3, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 8, generator=gen)
    perm = torch.randperm(T, generator=gen)
    with torch.no_grad():
        out, out_perm = layer(x), layer(x[perm])
        kept, kept_perm = layer.route(x).kept_TE, layer.route(x[perm]).kept_TE
    assert torch.equal(kept_perm, kept[perm])
    torch.testing.assert_close(out_perm.output, out.output[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_perm.aux_loss, out.aux_loss)


@PROPERTY
@given(probs=prob_rows(max_tokens=12, max_experts=10), data=st.data())
def test_router_fast_path_decides_like_the_sort(probs: torch.Tensor, data) -> None:
    """The router's CPU path reads each token's top CANDIDATES + 1 experts instead of sorting
    all of them; with few candidates, tokens land on both sides of its fallback (a prefix longer
    than the candidates, ties), and every decision must equal the full stable sort's."""
    T, E = probs.shape
    peak = data.draw(st.sampled_from([1.0, 4.0]), label="peak")  # sharper rows: shorter prefixes
    probs = probs.double().pow(peak).float()
    probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, 1.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    candidates = data.draw(st.integers(1, 4), label="candidates")
    threshold = data.draw(st.floats(0.05, 1.2), label="t")
    k = data.draw(st.integers(1, E), label="k")
    cap = data.draw(st.one_of(st.none(), st.integers(1, E)), label="max_experts")
    with mock.patch.object(router_module, "CANDIDATES", candidates):
        fast_threshold, _ = router_module.wanted_pairs(probs, "threshold", threshold, k, cap)
        fast_topk, _ = router_module.wanted_pairs(probs, "topk", threshold, k)
    assert torch.equal(fast_threshold, threshold_mask(probs, threshold, cap)[0])
    assert torch.equal(fast_topk, topk_mask(probs, k)[0])


def test_router_fast_path_sorts_only_the_rows_that_need_it() -> None:
    """Peaked rows with distinct probabilities are decided from their top experts alone; a row
    with a tie, or whose prefix runs past the candidates, goes to the sort, and only that row."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(4 * torch.randn(6, 32, generator=gen), dim=-1)  # ~2-4 experts reach 0.9
    probs[4] = 1 / 32  # uniform: ties everywhere, and a prefix of 29 experts
    sorted_rows = []

    def spy(p, threshold, max_experts=None):
        sorted_rows.append(p.shape[0])
        return threshold_mask(p, threshold, max_experts)

    with mock.patch.object(router_module, "threshold_mask", spy):
        fast, _ = router_module.wanted_pairs(probs, "threshold", 0.9, 2)
    assert sorted_rows == [1]  # row 4 only
    assert torch.equal(fast, threshold_mask(probs, 0.9)[0])


@PROPERTY
@given(probs=prob_rows(max_tokens=8, max_experts=10), data=st.data())
def test_host_decision_is_the_rule(probs: torch.Tensor, data) -> None:
    """A small call decided on the host (router.host_decision, from the probabilities read there)
    keeps exactly the rule's pairs, ties included, most probable first, with their probabilities
    (or 1) as weights; or declines (None) where capacity would drop a pair, and then the tensors
    decide. Decoding's grouping of it by expert (decode.HostPlan.from_decision) holds the same
    pairs, experts ascending, each one's tokens ascending."""
    T, E = probs.shape
    kind = data.draw(st.sampled_from(["threshold", "topk"]), label="rule")
    threshold = data.draw(st.floats(0.05, 1.2), label="t")
    k = data.draw(st.integers(1, E), label="k")
    cap = data.draw(st.one_of(st.none(), st.integers(1, E)), label="max_experts") if kind == "threshold" else None
    slots = data.draw(st.one_of(st.none(), st.integers(1, T)), label="slots")
    ones = data.draw(st.booleans(), label="ones")
    decision = router_module.host_decision(probs.tolist(), kind, threshold, k, cap, slots, ones=ones)
    wanted_TE, order_TE = threshold_mask(probs, threshold, cap) if kind == "threshold" else topk_mask(probs, k)
    assert (decision is None) == (not torch.equal(apply_capacity(probs, wanted_TE, None, slots), wanted_TE))
    if decision is None:
        return
    assert decision.num_tokens == T
    for t, (experts, weights) in enumerate(zip(decision.experts, decision.weights)):
        assert list(experts) == order_TE[t, :len(experts)].tolist()  # the rule's stable order
        assert sorted(experts) == torch.nonzero(wanted_TE[t]).squeeze(1).tolist()
        assert list(weights) == [1.0 if ones else probs[t, e].item() for e in experts]
    plan = HostPlan.from_decision(decision)
    grouped = [(e, [t for t in range(T) if wanted_TE[t, e]]) for e in range(E) if wanted_TE[:, e].any()]
    assert [(e, list(tokens)) for e, tokens in zip(plan.experts, plan.tokens)] == grouped
    assert plan.num_tokens == T
    for e, tokens, weights in zip(plan.experts, plan.tokens, plan.weights):
        assert list(weights) == [1.0 if ones else probs[t, e].item() for t in tokens]


def test_host_decision_declines_only_where_it_must() -> None:
    """Worked rows (E = 4, t = 0.9): rows are decided on the host, ties and long prefixes
    included; an expert wanted by more tokens than its slots is left to the tensors."""
    decide = router_module.host_decision
    rows = [[0.6, 0.25, 0.1, 0.05], [0.05, 0.1, 0.25, 0.6]]  # experts {0, 1, 2}, {3, 2, 1}
    decision = decide(rows, "threshold", 0.9, 2, None, None, ones=False)
    assert decision.experts == ((0, 1, 2), (3, 2, 1))  # most probable first
    assert decision.weights == ((0.6, 0.25, 0.1), (0.6, 0.25, 0.1))
    assert decision.num_tokens == 2
    assert decide(rows, "threshold", 0.9, 2, 2, None, ones=False).experts == ((0, 1), (3, 2))  # max_experts
    tie = [[0.5, 0.2, 0.2, 0.1]]  # top-2: expert 1 or 2? the rule says 1, the lower index
    assert decide(tie, "topk", 0.9, 2, None, None, ones=False).experts == ((0, 1),)
    assert decide([[0.25] * 4], "threshold", 0.9, 2, None, None, ones=False).experts == ((0, 1, 2, 3),)
    assert decide([[0.25] * 4], "topk", 0.9, 1, None, None, ones=False).experts == ((0,),)
    assert decide(rows, "topk", 0.9, 1, None, 1, ones=True).weights == ((1.0,), (1.0,))  # experts 0 and 3: 1 slot each
    assert decide([[0.6, 0.4], [0.7, 0.3]], "topk", 0.9, 1, None, 1, ones=False) is None  # overflow
    assert decide([[0.6, 0.4], [0.7, 0.3]], "topk", 0.9, 1, None, 2, ones=False) is not None  # fits


def test_host_plan_groups_a_decision_by_expert() -> None:
    """Worked example: token 0 keeps experts 2 then 0, token 1 keeps 0, token 2 keeps 2 then 3;
    by expert, ascending, each one's tokens ascending with their weights."""
    decision = router_module.HostDecision(experts=((2, 0), (0,), (2, 3)), weights=((0.5, 0.3), (0.9,), (0.6, 0.4)))
    plan = HostPlan.from_decision(decision)
    assert plan.experts == (0, 2, 3)
    assert plan.tokens == ((0, 1), (0, 2), (2,))
    assert plan.weights == ((0.3, 0.9), (0.5, 0.6), (0.4,))
    assert plan.num_tokens == 3
