"""A float64 reference for the XMoE layer, written one token at a time, as plainly as possible.

It implements docs/method.md, "The routing rule, exactly", without importing anything from xmoe,
so the tests hold the library to an independent computation:

    p = softmax(W_g x)                                   float64
    experts of a token, by rank: sorted by (-p, expert index)
    threshold rule: rank j is wanted iff j == 0 or p(0) + ... + p(j-1) < t   (t >= 1: all),
                    then at most max_experts of them (when set)
    top-k rule:     the first k ranks
    capacity        C = min(S, max(ceil(gamma * S / E), m))                 (None: dropless)
    per expert: keep the C wanted pairs of highest priority (K - r) + p, ties -> lower token
    y_t = sum over kept e of w_te * FFN_e(x_t),  w_te = p_te (/ sum of wanted p_t if renormalize)

Decisions (which pairs) are taken on Python floats and carry no gradient; the output is built
from float64 tensors, so autograd through it gives the reference gradients (the router weight's
gradient flows only through the combine weights p_te).

Shapes: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------- routing rules


def experts_by_rank(p_E: list[float]) -> list[int]:
    """A token's experts, most probable first; equal probabilities: lower expert index first."""
    return sorted(range(len(p_E)), key=lambda e: (-p_E[e], e))


def threshold_choice(p_E: list[float], threshold: float) -> list[int]:
    """The wanted experts of one token under the threshold rule, in rank order."""
    order = experts_by_rank(p_E)
    if threshold >= 1:
        return order
    chosen, mass_before = [], 0.0
    for j, e in enumerate(order):
        if j > 0 and not mass_before < threshold:
            break
        chosen.append(e)
        mass_before += p_E[e]
    return chosen


def topk_choice(p_E: list[float], k: int) -> list[int]:
    return experts_by_rank(p_E)[:k]


def capacity(num_tokens: int, num_experts: int, factor: float | None, min_capacity: int) -> int | None:
    if factor is None:
        return None
    exact = Fraction(str(factor)) * num_tokens / num_experts  # the factor as written, no float noise
    return min(num_tokens, max(math.ceil(exact), min_capacity))


def priority(wanted_T: list[list[int]], p_TE: list[list[float]], t: int, e: int) -> float:
    """(K - r) + p of the pair (t, e); K: the most experts any token wants."""
    K = max(len(w) for w in wanted_T)
    return (K - wanted_T[t].index(e)) + p_TE[t][e]


def expert_queues(p_TE: list[list[float]], wanted_T: list[list[int]], num_experts: int) -> list[list[int]]:
    """For each expert, the tokens that want it, highest priority first (ties: lower token)."""
    queues = []
    for e in range(num_experts):
        tokens = [t for t, w in enumerate(wanted_T) if e in w]
        tokens.sort(key=lambda t: (-priority(wanted_T, p_TE, t, e), t))
        queues.append(tokens)
    return queues


def keep_pairs(p_TE: list[list[float]], wanted_T: list[list[int]], num_experts: int, slots: int | None) -> set:
    """The (token, expert) pairs that survive capacity."""
    if slots is None:
        return {(t, e) for t, w in enumerate(wanted_T) for e in w}
    queues = expert_queues(p_TE, wanted_T, num_experts)
    return {(t, e) for e, queue in enumerate(queues) for t in queue[:slots]}


@dataclass
class Routing:
    wanted: list[list[int]]  # per token, its wanted experts in rank order
    kept: set  # (token, expert) pairs after capacity
    capacity: int | None
    margin: float  # how far the decisions are from flipping (inf when nothing is close)

    def kept_experts(self, t: int) -> list[int]:
        return [e for e in self.wanted[t] if (t, e) in self.kept]

    def wanted_mask(self, num_experts: int) -> torch.Tensor:
        mask = torch.zeros(len(self.wanted), num_experts, dtype=torch.bool)
        for t, w in enumerate(self.wanted):
            mask[t, w] = True
        return mask

    def kept_mask(self, num_experts: int) -> torch.Tensor:
        mask = torch.zeros(len(self.wanted), num_experts, dtype=torch.bool)
        for t, e in self.kept:
            mask[t, e] = True
        return mask


def route(
    p_TE: list[list[float]],
    *,
    num_experts: int,
    rule: str,
    threshold: float,
    top_k: int,
    capacity_factor: float | None,
    min_capacity: int,
    max_experts: int | None = None,
) -> Routing:
    num_tokens = len(p_TE)
    if rule == "threshold":
        wanted = [threshold_choice(p, threshold)[:max_experts] for p in p_TE]
    else:
        wanted = [topk_choice(p, top_k) for p in p_TE]
    slots = capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    kept = keep_pairs(p_TE, wanted, num_experts, slots)
    margin = _margin(p_TE, wanted, rule, threshold, num_experts, slots)
    return Routing(wanted, kept, slots, margin)


def _margin(p_TE, wanted_T, rule, threshold, num_experts, slots) -> float:
    """The smallest relative distance of any decision from its boundary.

    The library routes on fp32 probabilities, this oracle on float64 ones; the two agree
    wherever the decisions are further from a boundary than fp32 rounding (a relative error of
    a few 1e-7 in each p). Gaps between probabilities are taken relative to the larger one;
    exclusive sums against t, absolutely. Exact ties (distance exactly 0) are left out: both
    sides then break them by the same index rule.
    """

    def rel(a: float, b: float) -> float:
        return (a - b) / max(abs(a), abs(b), 1e-300)

    gaps = []
    for p, w in zip(p_TE, wanted_T):
        ranked = sorted(p, reverse=True)[: len(w) + 1]  # wanted ranks and the first unwanted
        if len(w) < len(p):  # which expert is the last one in
            gaps.append(rel(ranked[len(w) - 1], ranked[len(w)]))
        if slots is not None:  # under capacity the ranks of the wanted experts matter too
            gaps += [rel(a, b) for a, b in zip(ranked[: len(w)], ranked[1 : len(w)])]
        if rule == "threshold" and threshold < 1:
            before = 0.0
            for j, q in enumerate(ranked):
                if j > 0:
                    gaps.append(abs(before - threshold))
                before += q
    if slots is not None:
        for e, queue in enumerate(expert_queues(p_TE, wanted_T, num_experts)):
            if len(queue) > slots:
                a, b = queue[slots - 1], queue[slots]  # the last one kept, the first one dropped
                gap = priority(wanted_T, p_TE, a, e) - priority(wanted_T, p_TE, b, e)
                gaps.append(gap / max(p_TE[a][e], p_TE[b][e]))
    return min((g for g in gaps if g != 0), default=math.inf)


# ----------------------------------------------------------------------------- the layer


@dataclass
class Params:
    """float64 copies of a layer's weights in the library's layout (x @ w, no transposes)."""

    router: torch.Tensor  # [E, D]
    w1: torch.Tensor  # [E, D, F]
    w2: torch.Tensor  # [E, F, D]
    w3: torch.Tensor | None = None  # [E, D, F], SwiGLU only
    b1: torch.Tensor | None = None  # [E, F]
    b2: torch.Tensor | None = None  # [E, D]
    b3: torch.Tensor | None = None  # [E, F]

    def named(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def softmax(logits_TE: torch.Tensor) -> torch.Tensor:
    shifted = logits_TE - logits_TE.max(dim=-1, keepdim=True).values
    exp = shifted.exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def gelu(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def gelu_tanh(z):
    """GPT-2's approximation: 0.5 z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3)))."""
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def relu(z):
    return torch.where(z > 0, z, torch.zeros_like(z))


def silu(z):
    return z / (1 + torch.exp(-z))


def ffn(x_D: torch.Tensor, P: Params, e: int, activation: str) -> torch.Tensor:
    """Expert e on one token: act(x w1 + b1) w2 + b2, or SwiGLU's (silu(x w1 + b1) * (x w3 + b3)) w2 + b2."""

    def bias(b):
        return b[e] if b is not None else 0.0

    up = x_D @ P.w1[e] + bias(P.b1)
    if activation == "swiglu":
        hidden = silu(up) * (x_D @ P.w3[e] + bias(P.b3))
    else:
        hidden = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu}[activation](up)
    return hidden @ P.w2[e] + bias(P.b2)


def combine_weights(probs_TE: torch.Tensor, routing: Routing, renormalize: bool, ones: bool = False) -> torch.Tensor:
    """Dense [T, E] float64 weights: p (or p / wanted mass, or 1 with ``ones``) on kept pairs, 0 elsewhere."""
    T, E = probs_TE.shape
    rows = []
    for t in range(T):
        wanted_mass = sum(probs_TE[t, e] for e in routing.wanted[t])
        row = []
        for e in range(E):
            if (t, e) in routing.kept:
                if ones:
                    row.append(probs_TE.new_ones(()))
                else:
                    row.append(probs_TE[t, e] / wanted_mass if renormalize else probs_TE[t, e])
            else:
                row.append(probs_TE.new_zeros(()))
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else probs_TE.new_zeros(0, E)


def forward(
    x_TD: torch.Tensor,
    P: Params,
    *,
    rule: str,
    threshold: float,
    top_k: int,
    capacity_factor: float | None,
    min_capacity: int,
    renormalize: bool,
    activation: str,
    route_probs: list[list[float]] | None = None,
    combine: str = "probs",
    max_experts: int | None = None,
):
    """The layer's output [T, D] float64, its probabilities [T, E] and routing decisions.

    ``route_probs``: take the decisions from these probabilities instead of the oracle's own
    float64 ones (used where random inputs could sit on a boundary; every caller says so).
    """
    probs_TE = softmax(x_TD @ P.router.T)
    decide_on = probs_TE.detach().tolist() if route_probs is None else route_probs
    routing = route(
        decide_on,
        num_experts=P.router.shape[0],
        rule=rule,
        threshold=threshold,
        top_k=top_k,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        max_experts=max_experts,
    )
    weights_TE = combine_weights(probs_TE, routing, renormalize, ones=combine == "ones")
    outputs = []
    for t in range(x_TD.shape[0]):
        y_D = x_TD.new_zeros(x_TD.shape[1])
        for e in routing.kept_experts(t):
            y_D = y_D + weights_TE[t, e] * ffn(x_TD[t], P, e, activation)
        outputs.append(y_D)
    y_TD = torch.stack(outputs) if outputs else x_TD.new_zeros(0, x_TD.shape[1])
    return y_TD, probs_TE, weights_TE, routing


def balancing_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e; f_e from each token's top-1 expert (ties: lower index), no gradient."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.new_zeros(())
    top1 = [experts_by_rank(row)[0] for row in probs_TE.detach().tolist()]
    loss = probs_TE.new_zeros(())
    for e in range(E):
        f_e = top1.count(e) / T
        P_e = sum(probs_TE[t, e] for t in range(T)) / T
        loss = loss + f_e * P_e
    return E * loss
