"""Decoding on a CPU: a layer call of a few tokens at inference, routed, planned and computed on
the host in one function (``decode``), which MoELayer.forward tries first.

A decoding call is a few GEMVs, each streaming one expert's weights (2.4 MB at GPT-2-small
shapes) through a core's 2 MB L2 cache, so every Python step and small op after one runs with
cold caches: a small torch op costs ~10 µs there instead of 2, and an ``nn.Module`` attribute
read (``Module.__getattr__``) ~1 µs even warm (benchmarks/README.md, "Decoding"). The floor is
the GEMVs alone; this path is the routing rule and those GEMVs with as little as it allows
between them:

    router    the gate's GEMM (on its weight's transpose, kept: Router.weight_t) and softmax, and
              one read of the probabilities to the host, where the rule decides
              (router.host_decision) and the non-finite check looks (``finite``)
    experts   for each kept expert of a token: the up GEMM, its activation, and the down GEMM
              adding into the token's row with the combine weight as its ``alpha``; a token's
              first expert writes the row itself (``addmm(b2, h, w2, beta=w, alpha=w)``)

No masks, sort or scatter (the [T, E] masks are built only when read: statistics, hooks), the
router and the experts are not called as modules where that changes nothing (no hooks, no
wrapper), module attributes are read from the modules' dicts, and the expert weights are views
kept between calls (Experts.per_expert). A few tokens are grouped by expert on the host
(``HostPlan``), each expert running once on its tokens.

Taken in eval mode under no grad, for a CPU input of at most DIRECT_MAX_TOKENS tokens, with the
backend ``auto`` or ``direct`` and every expert in this process. ``decode`` returns None, and the
layer runs its general path (which decides the same pairs), where the call needs the tensors:
capacity would drop a pair (the priority order decides who), a router or experts with hooks, a
wrapped router, or a rule only the tensors apply (``renormalize``, static mode: torch.compile's
mode never comes here).

Shapes: T tokens, D model dim, F expert dim, E experts, n one expert's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .activations import ELEMENTWISE, activate
from .backends import DIRECT_MAX_TOKENS
from .config import capacity
from .experts import Experts
from .output import MoEOutput
from .router import HostDecision, Router, RouterOutput, gate_logits, host_decision, non_finite_error

BACKENDS = ("auto", "direct")  # a layer's backend settings under which its decoding calls take this path


def decode(layer, x: Tensor) -> MoEOutput | None:
    """MoELayer.forward on ``x`` [..., D] where it is an inference call of a few CPU tokens that
    the host can decide, else None (the layer runs its general path; this module's docstring).

    One function, as flat as the rule allows: each Python call here runs with cold caches.
    """
    cfg = layer.cfg
    D = cfg.model_dim
    if (layer.training or torch.is_grad_enabled() or not x.is_cpu or layer.backend not in BACKENDS
            or x.ndim == 0 or x.shape[-1] != D or not 0 < x.numel() <= DIRECT_MAX_TOKENS * D
            or not layer.dispatcher.local):
        return None
    router, experts = layer._modules["router"], layer._modules["experts"]
    if type(router) is not Router or not router._host_rule or _hooked(router, experts):
        return None
    dial, weight = router._modules["dial"], router._parameters["weight"]
    x_TD = x.reshape(-1, D)
    autocast = torch.is_autocast_enabled("cpu")
    if x.dtype != weight.dtype and not autocast:  # the general path says what is wrong
        return None
    if autocast or x.dtype != torch.float32:
        logits_TE = gate_logits(x_TD, weight)
    else:  # gate_logits with nothing to cast, and no transpose: each op costs ~10 µs here
        logits_TE = torch.mm(x_TD, router.weight_t())
    probs_TE = logits_TE.softmax(dim=-1)
    rows = probs_TE.tolist()  # the call's one host read
    slots = capacity(len(rows), len(rows[0]), dial.eval_capacity_factor, cfg.min_capacity)
    host = host_decision(rows, cfg.router, dial.threshold, dial.top_k, dial.max_experts, slots,
                         ones=cfg.combine == "ones")
    if host is None:
        return None
    # None checks where it is free, and here it is (static mode never comes here).
    if cfg.check_finite is not False and not finite(rows, logits_TE):
        raise non_finite_error()
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype  # the experts' compute dtype
    if type(experts) is Experts:
        y_TD = run_experts(experts, x_TD, host, dtype)
    else:  # a wrapper (PEFT's LoRA) changes the weights only inside its call
        y_TD = experts(run_experts, x_TD, host, dtype)
    y = (y_TD if y_TD.dtype == x.dtype else y_TD.to(x.dtype)).reshape(x.shape)
    return MoEOutput(y, RouterOutput(logits_TE, probs_TE, slots, host=host), cfg, "direct")


def finite(rows: list[list[float]], logits_TE: Tensor) -> bool:
    """Whether every logit is finite, from the probabilities already read (``rows``): a NaN or +inf
    logit makes its token's probabilities NaN, and a -inf one its own exactly 0, so where every
    probability is > 0 and their sum is a number, every logit is finite. Else (one of those, or
    a probability that underflowed to 0) the logits are read: a float64 sum of at most
    DIRECT_MAX_TOKENS * E fp32 numbers cannot overflow, so it is finite iff every term is."""
    if min(map(min, rows)) > 0.0 and math.isfinite(sum(map(sum, rows))):
        return True
    return math.isfinite(sum(map(sum, logits_TE.tolist())))


@dataclass(frozen=True)
class HostPlan:
    """A small call's kept pairs grouped by expert on the host, in Python from the router's host
    decision (no tensor op, no sync): the plan ``run_experts`` runs a few tokens from."""

    experts: tuple[int, ...]  # the experts with pairs, ascending
    tokens: tuple[tuple[int, ...], ...]  # each one's tokens, ascending
    weights: tuple[tuple[float, ...], ...]  # their combine weights
    num_tokens: int

    @classmethod
    def from_decision(cls, decision: HostDecision) -> HostPlan:
        """Group a host decision's pairs by expert (capacity was applied by the router: every
        pair of the decision runs)."""
        by_expert: dict[int, tuple[list[int], list[float]]] = {}
        for t, (experts, weights) in enumerate(zip(decision.experts, decision.weights)):
            for e, w in zip(experts, weights):
                tokens, expert_weights = by_expert.setdefault(e, ([], []))
                tokens.append(t)
                expert_weights.append(w)
        experts = sorted(by_expert)
        return cls(tuple(experts), tuple(tuple(by_expert[e][0]) for e in experts),
                   tuple(tuple(by_expert[e][1]) for e in experts), decision.num_tokens)


def run_experts(experts: Experts, x_TD: Tensor, host: HostDecision, dtype: torch.dtype) -> Tensor:
    """The kept pairs of ``host`` through their experts in ``dtype``, weighted and summed per
    token: [T, D] fp32. Each expert runs once, on its tokens, from views of its weights (no
    autograd)."""
    views = experts.per_expert(dtype)
    if x_TD.dtype != dtype:
        x_TD = x_TD.to(dtype)
    activation = experts.activation
    if x_TD.shape[0] == 1:  # decoding's call: every kept expert takes the one token
        out_1D = None
        for e, weight in zip(host.experts[0], host.weights[0]):
            out_1D = _add_expert(out_1D, out_1D is None, x_TD, views[e], weight, activation)
        return out_1D
    plan = HostPlan.from_decision(host)
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)  # fp32: a token sums several experts
    x_rows, out_rows = x_TD.split(1), out_TD.split(1)  # views, for the experts of one token
    fresh = [True] * plan.num_tokens  # rows nothing was added to yet
    for e, tokens, weights in zip(plan.experts, plan.tokens, plan.weights):
        if len(tokens) == 1:
            t = tokens[0]
            _add_expert(out_rows[t], fresh[t], x_rows[t], views[e], weights[0], activation)
            fresh[t] = False
            continue
        # An expert's tokens are distinct and ascending: all of them is x itself.
        w1, b1, w2, b2, w3, b3 = views[e]
        x_nD = x_TD if len(tokens) == plan.num_tokens else torch.cat([x_rows[t] for t in tokens])
        y_nD = _linear(_hidden(activation, x_nD, w1, b1, w3, b3), w2, b2)
        for t, y_1D, weight in zip(tokens, y_nD.split(1), weights):  # a few rows: no index tensors
            out_rows[t].add_(y_1D, alpha=weight)
            fresh[t] = False
    return out_TD


def _add_expert(
    out_1D: Tensor | None, fresh: bool, x_1D: Tensor, view: tuple, weight: float, activation: str
) -> Tensor:
    """``out + weight * FFN_e(x)`` for one token's row, in fp32, in ``out`` (None: a new one). Where
    ``fresh`` (nothing added to ``out`` yet) the down GEMM writes the row itself,
    ``addmm(b2, h, w2, beta=w, alpha=w)``, else it adds with the weight as its ``alpha``. For
    experts with biases and no gate (GPT-2's), every step is one op, with no Python call between
    the GEMMs."""
    w1, b1, w2, b2, w3, b3 = view
    elementwise = ELEMENTWISE.get(activation)
    if elementwise is not None and b1 is not None:
        h_1F = elementwise(torch.addmm(b1, x_1D, w1))
    else:
        h_1F = _hidden(activation, x_1D, w1, b1, w3, b3)
    if h_1F.dtype != torch.float32:  # a GEMM takes one dtype: compute, then add in fp32
        y_1D = _linear(h_1F, w2, b2)
        return y_1D.float().mul_(weight) if out_1D is None else out_1D.add_(y_1D, alpha=weight)
    if fresh and b2 is not None:
        return torch.addmm(b2, h_1F, w2, beta=weight, alpha=weight, out=out_1D)
    if out_1D is None:
        return torch.mm(h_1F, w2).mul_(weight)
    out_1D.addmm_(h_1F, w2, alpha=weight)
    return out_1D if b2 is None else out_1D.add_(b2, alpha=weight)


def _hidden(
    activation: str, x_nD: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor | None, b3: Tensor | None
) -> Tensor:
    """One expert's activation on its rows: act(x w1 + b1), gated by x w3 + b3 for SwiGLU."""
    return activate(activation, _linear(x_nD, w1, b1), None if w3 is None else _linear(x_nD, w3, b3))


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


def _hooked(router: nn.Module, experts: nn.Module) -> bool:
    """Whether calling the router or the experts would run more than its forward (forward hooks,
    its own or global): then the call takes the general path, which calls them as modules."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or router._forward_hooks or router._forward_pre_hooks
                or experts._forward_hooks or experts._forward_pre_hooks)
