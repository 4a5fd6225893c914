"""Worked examples of the routing rule (docs/method.md, "The routing rule, exactly"), on hand-written
probability rows, for threshold_mask, topk_mask, apply_capacity and capacity.

Rows are in expert order; the comment beside each gives the sorted p, the exclusive sums and
the experts that must be picked. Numbers like 0.5 / 0.25 / 0.125 are exact in binary, so the
rows whose exclusive sum lands exactly on t really test the strict `<`.
"""

from __future__ import annotations

import pytest
import torch

from helpers import oracle
from helpers.moe import make_layer, run_oracle
from xmoe.moe import apply_capacity, capacity, threshold_mask, topk_mask


def _probs(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _experts(mask_TE: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask_TE]


THRESHOLD_EXAMPLES = [
    # The paper's example, experts shuffled: sorted [0.60, 0.25, 0.10, 0.03, 0.02],
    # exclusive sums [0, 0.60, 0.85, 0.95, 0.98] -> ranks 0, 1, 2 = experts 1, 4, 3.
    (0.9, [0.03, 0.60, 0.02, 0.10, 0.25], {1, 4, 3}),
    # t <= p(1): the top expert alone (exclusive sum 0.5 is not < 0.5).
    (0.5, [0.25, 0.5, 0.125, 0.125], {1}),
    (0.3, [0.25, 0.5, 0.125, 0.125], {1}),
    (1e-9, [0.25, 0.25, 0.25, 0.25], {0}),
    # Exclusive sum exactly t stops there: sorted [0.5, 0.25, 0.125, 0.125],
    # exclusive [0, 0.5, 0.75, 0.875]; 0.75 < 0.75 is false -> experts 2, 0 only.
    (0.75, [0.25, 0.125, 0.5, 0.125], {2, 0}),
    # ... and just above it, the third one comes in.
    (0.75 + 2**-20, [0.25, 0.125, 0.5, 0.125], {2, 0, 1}),
    # Ties: equal p go to the lower expert index. Sorted experts 0, 1, 2, 3.
    (0.5, [0.25, 0.25, 0.25, 0.25], {0, 1}),
    (0.5 + 2**-20, [0.25, 0.25, 0.25, 0.25], {0, 1, 2}),
    # Tie at the boundary: sorted experts 1, 2 (0.375 each), then 0, 3 (0.125 each);
    # exclusive [0, 0.375, 0.75, 0.875] -> t = 0.8 takes 1, 2 and the lower of the tied 0 / 3.
    (0.8, [0.125, 0.375, 0.375, 0.125], {1, 2, 0}),
    # t = 1: every expert, exactly, even those with p = 0 (exclusive sum never below 1 in fp).
    (1.0, [1.0, 0.0, 0.0, 0.0], {0, 1, 2, 3}),
    (1.0, [0.0625, 0.5, 0.25, 0.125, 0.0625], {0, 1, 2, 3, 4}),
    (1.5, [0.25, 0.5, 0.125, 0.125], {0, 1, 2, 3}),
    # t just below 1 with a one-hot row: exclusive sum after expert 0 is 1.0, not < t.
    (0.999, [1.0, 0.0, 0.0, 0.0], {0}),
    # A single dominant expert: sorted [0.953125, 0.015625 x 3] -> expert 1 alone at t = 0.9.
    (0.9, [0.015625, 0.953125, 0.015625, 0.015625], {1}),
    # One expert in all: p = 1, any t.
    (0.9, [1.0], {0}),
    (1.0, [1.0], {0}),
]


@pytest.mark.parametrize("threshold, row, expected", THRESHOLD_EXAMPLES)
def test_threshold_mask_worked_examples(threshold: float, row: list[float], expected: set[int]) -> None:
    wanted_TE, order_TE = threshold_mask(_probs(row), threshold)
    assert _experts(wanted_TE) == [expected]
    assert wanted_TE.dtype == torch.bool
    # The oracle agrees on the same row (its own sanity check on the examples).
    assert set(oracle.threshold_choice(row, threshold)) == expected
    # The token's experts from most to least probable (ties: lower index first).
    assert order_TE[0].tolist() == oracle.experts_by_rank(row)


MAX_EXPERTS_EXAMPLES = [
    # The paper's example capped at 2: sorted experts 1, 4, 3 wanted -> the first two, 1 and 4.
    (0.9, 2, [0.03, 0.60, 0.02, 0.10, 0.25], {1, 4}),
    # A cap above the wanted count changes nothing.
    (0.9, 4, [0.03, 0.60, 0.02, 0.10, 0.25], {1, 4, 3}),
    # t >= 1 with a cap is top-k: ties to the lower index (sorted experts 0, 1, 2, 3).
    (1.0, 3, [0.25, 0.25, 0.25, 0.25], {0, 1, 2}),
    # A cap of 1 is top-1.
    (0.99, 1, [0.125, 0.375, 0.375, 0.125], {1}),
]


@pytest.mark.parametrize("threshold, cap, row, expected", MAX_EXPERTS_EXAMPLES)
def test_threshold_mask_max_experts_keeps_the_first_ranks(threshold, cap, row, expected) -> None:
    """max_experts (a deviation from the paper, for static shapes): the threshold rule, then at
    most ``cap`` of the token's experts, most probable first."""
    wanted, _ = threshold_mask(_probs(row), threshold, cap)
    assert _experts(wanted) == [expected]
    assert expected == set(oracle.threshold_choice(row, threshold)[:cap])


def test_threshold_mask_rows_are_independent() -> None:
    """Several tokens at once: each row is decided on its own."""
    rows = [row for t, row, _ in THRESHOLD_EXAMPLES if t == 0.9 and len(row) == 5]
    rows += [[0.0625, 0.5, 0.25, 0.125, 0.0625], [0.2, 0.2, 0.2, 0.2, 0.2]]
    wanted_TE, _ = threshold_mask(_probs(*rows), 0.9)
    # Last row: five ties at 0.2, exclusive sums 0, .2, .4, .6, .8 (all < 0.9) -> all five.
    # Second-to-last: sorted experts 1, 2, 3, 0, 4; exclusive 0, .5, .75, .875 -> 1, 2, 3, 0.
    assert _experts(wanted_TE) == [{1, 4, 3}, {1, 2, 3, 0}, {0, 1, 2, 3, 4}]


def test_threshold_mask_no_tokens() -> None:
    wanted_TE, order_TE = threshold_mask(torch.empty(0, 4), 0.9)
    assert wanted_TE.shape == (0, 4) and order_TE.shape == (0, 4)


TOPK_EXAMPLES = [
    (2, [0.03, 0.60, 0.02, 0.10, 0.25], {1, 4}),  # sorted experts 1, 4, 3, 0, 2
    (1, [0.125, 0.375, 0.375, 0.125], {1}),  # tie 1 / 2 -> lower index
    (3, [0.125, 0.375, 0.375, 0.125], {1, 2, 0}),  # tie 0 / 3 -> lower index
    (2, [0.25, 0.25, 0.25, 0.25], {0, 1}),
    (4, [0.25, 0.5, 0.125, 0.125], {0, 1, 2, 3}),  # k = E: all
]


@pytest.mark.parametrize("k, row, expected", TOPK_EXAMPLES)
def test_topk_mask_worked_examples(k: int, row: list[float], expected: set[int]) -> None:
    wanted_TE, order_TE = topk_mask(_probs(row), k)
    assert _experts(wanted_TE) == [expected]
    assert order_TE[0].tolist() == oracle.experts_by_rank(row)


def _capacity_case(rows, threshold):
    probs = _probs(*rows)
    wanted, order = threshold_mask(probs, threshold)
    return probs, wanted, order


def test_apply_capacity_first_choices_then_probability() -> None:
    # Two experts, four tokens, t = 0.9 (every token wants both; K = 2), 2 slots per expert.
    #   token 0: [0.75, 0.25]   ranks [0, 1]  priorities e0: 2.75   e1: 1.25
    #   token 1: [0.5, 0.5]     ranks [0, 1]  (tie -> expert 0 first)  e0: 2.5   e1: 1.5
    #   token 2: [0.25, 0.75]   ranks [1, 0]  e0: 1.25  e1: 2.75
    #   token 3: [0.875, 0.125] ranks [0, 1]  e0: 2.875 e1: 1.125
    # Expert 0 keeps tokens 3 and 0 (token 1's first choice loses on p);
    # expert 1 keeps token 2 (a first choice) and token 1 (the best second choice).
    probs, wanted, order = _capacity_case([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.875, 0.125]], 0.9)
    assert wanted.all()
    kept = apply_capacity(probs, wanted, order, 2)
    assert _experts(kept) == [{0}, {1}, {1}, {0}]


def test_apply_capacity_rank_beats_probability() -> None:
    # One slot per expert. Expert 0 is token B's first choice at p = 0.3125 and token A's second
    # choice at p = 0.4375: the first choice wins despite its lower probability.
    #   A: [0.4375, 0.5, 0.0625, 0.0]      t = 0.9: experts 1, 0 (exclusive 0, 0.5 -> 0.9375)
    #   B: [0.3125, 0.25, 0.25, 0.1875]    t = 0.9: experts 0, 1, 2, 3 (exclusive .3125 .5625 .8125)
    # K = 4; expert 0: A -> (4-1) + 0.4375 = 3.4375, B -> 4 + 0.3125 = 4.3125 -> keeps B.
    # expert 1: A -> 4.5, B -> 3.25 -> keeps A. Experts 2, 3: only B wants them -> kept.
    probs, wanted, order = _capacity_case([[0.4375, 0.5, 0.0625, 0.0], [0.3125, 0.25, 0.25, 0.1875]], 0.9)
    assert _experts(wanted) == [{0, 1}, {0, 1, 2, 3}]
    kept = apply_capacity(probs, wanted, order, 1)
    assert _experts(kept) == [{1}, {0, 2, 3}]  # A keeps 1; B keeps 0, 2, 3


def test_apply_capacity_equal_priority_goes_to_earlier_token() -> None:
    # Four identical tokens, top-1 on expert 1 (tie with expert 2 -> lower index), 3 slots:
    # all four priorities are equal, so the first three tokens are kept.
    row = [0.125, 0.375, 0.375, 0.125]
    probs = _probs(row, row, row, row)
    wanted, order = topk_mask(probs, 1)
    kept = apply_capacity(probs, wanted, order, 3)
    assert _experts(kept) == [{1}, {1}, {1}, set()]


def test_apply_capacity_zero_token_expert_and_dropless() -> None:
    # Experts 2 and 3 are nobody's choice (top-1): they keep nothing, and no slots are wasted.
    probs = _probs([0.5, 0.25, 0.125, 0.125], [0.25, 0.5, 0.125, 0.125], [0.625, 0.125, 0.125, 0.125])
    wanted, order = topk_mask(probs, 1)
    # Expert 0 is wanted by tokens 0 (p .5) and 2 (p .625): one slot keeps token 2.
    assert _experts(apply_capacity(probs, wanted, order, 1)) == [set(), {1}, {0}]
    assert _experts(apply_capacity(probs, wanted, order, 2)) == [{0}, {1}, {0}]
    assert torch.equal(apply_capacity(probs, wanted, order, None), wanted)  # dropless
    empty = torch.empty(0, 4)
    assert apply_capacity(empty, empty.bool(), empty.long(), 3).shape == (0, 4)


@pytest.mark.parametrize(
    "tokens, experts, factor, min_capacity, expected",
    [
        (24, 8, 1.0, 4, 4),  # ceil(3) = 3 < m = 4
        (24, 8, 2.0, 4, 6),  # ceil(6) = 6
        (10, 4, 1.25, 0, 4),  # ceil(3.125) = 4
        (10, 4, 1.25, 1, 4),
        (2, 8, 1.0, 4, 2),  # m = 4 > S = 2: clamped to S
        (3, 2, 8.0, 4, 3),  # the paper's gamma = 8 on a tiny batch: clamped to S
        (0, 8, 2.0, 4, 0),  # no tokens, no slots
        (24, 8, None, 4, None),  # dropless
        (100, 10, 1.1, 0, 11),  # 1.1 * 100 / 10 is 11.000000000000002 in floats: still 11 slots
    ],
)
def test_capacity_formula(tokens, experts, factor, min_capacity, expected) -> None:
    assert capacity(tokens, experts, factor, min_capacity) == expected
    assert oracle.capacity(tokens, experts, factor, min_capacity) == expected


@pytest.mark.parametrize(
    "cfg",
    [
        dict(threshold=0.9),
        dict(threshold=0.5, capacity_factor=1.0, min_capacity=1),
        dict(router="topk", top_k=2, capacity_factor=1.0, min_capacity=1),
        dict(router="topk", top_k=3, renormalize=True, capacity_factor=1.0, min_capacity=1),
        dict(threshold=0.7, renormalize=True),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_route_combine_weights_equal_oracle(cfg: dict) -> None:
    layer = make_layer(seed=5, **cfg)
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    _, _, weights64, routing = run_oracle(layer, x)
    assert routing.margin > 2e-6  # decisions far from fp32 rounding of the boundaries
    weights = layer.route(x).weights_TE
    assert weights.shape == (20, 8) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), weights64.detach(), rtol=1e-6, atol=1e-7)
    # Zeros exactly where nothing is computed.
    assert torch.equal(weights != 0, routing.kept_mask(8))
