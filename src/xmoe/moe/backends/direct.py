"""The "direct" backend, the small-T path: for a few tokens (decoding), each kept expert's GEMV
chain on its tokens, added straight into the output.

One token through one expert is two GEMVs that read the expert's weights once: the floor.
Everything else a layer call does is paid per call, not per token, and the other backends are
built to amortise it over thousands of tokens. This one does, per expert with pairs,

    out[t] += w_te * FFN_e(x_t)          for the tokens t of expert e (one GEMM chain)

and nothing else: no gather when the expert takes every token of the call (at T = 1, always),
no autograd Function.

At inference on the CPU the plan is a ``HostPlan`` (the router decided on the host,
router.HostDecision, and the dispatcher grouped the pairs by expert there, dispatch.py): the
experts' tensors are views made once (``Experts.per_expert``), a weight is a number, and a
token's weighted sum is accumulated by the GEMM itself (``out.addmm_(h, w2, alpha=w)``): per
expert of one token, four ops (``addmm``, ``gelu``, ``addmm_``, ``add_`` of the bias) against
the floor's three, and three for the first, whose ``addmm(b2, h, w2, beta=w, alpha=w)``
makes the sum.

With a ``DispatchPlan`` (training, or a call the host could not decide), its ops are plain
differentiable torch ops, so autograd writes the backward (tested against the float64 oracle,
and faster than the fused backend's up to 64 tokens; benchmarks/README.md). Weights are then
indexed per expert (``w1[e]``, a view); when a weight gradient is wanted they are split once
with ``unbind`` instead, whose backward makes one [E, ...] gradient (indexing would make one
per expert: backends/loop.py).

Shapes: T tokens, D model dim, F expert dim, E experts, n one expert's pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import HostPlan
from ..experts import compute_dtype
from .loop import _linear, per_expert


def direct_backend(experts, x_TD: Tensor, plan, dispatcher=None) -> Tensor:
    """The kept pairs of ``plan`` through their experts, weighted and summed per token: [T, D] fp32."""
    if isinstance(plan, HostPlan):
        return _run_host_plan(experts, x_TD, plan)
    if plan.counts is None:
        raise ValueError("backend='direct' needs the per-expert counts on the host; static mode needs 'grouped_mm'")
    w = experts.weights(compute_dtype(x_TD))  # autocast's dtype: addmm would cast, gelu would not
    split = torch.is_grad_enabled() and w.w1.requires_grad
    E = experts.num_experts
    w1, b1, w2, b2, w3, b3 = (per_expert(p, E, split=split) for p in (w.w1, w.b1, w.w2, w.b2, w.w3, w.b3))
    x_TD = x_TD.to(w.w1.dtype)
    num_tokens = x_TD.shape[0]
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)  # fp32: a token sums several experts
    weight_N1 = plan.weight_N.unsqueeze(1)
    stop = 0
    for e, n in enumerate(plan.counts):
        if not n:
            continue
        rows, stop = slice(stop, stop + n), stop + n
        # An expert's tokens are distinct and ascending: all of them is x itself.
        tokens_n = None if n == num_tokens else plan.token_idx_N[rows]
        x_nD = x_TD if tokens_n is None else x_TD.index_select(0, tokens_n)
        up = _linear(x_nD, w1[e], b1[e])
        gate = _linear(x_nD, w3[e], b3[e]) if w3[e] is not None else None
        y_nD = _linear(experts.hidden(up, gate), w2[e], b2[e])
        if tokens_n is None:
            out_TD.addcmul_(y_nD, weight_N1[rows])
        else:
            out_TD.index_add_(0, tokens_n, y_nD.float() * weight_N1[rows])
    return out_TD


def _run_host_plan(experts, x_TD: Tensor, plan: HostPlan) -> Tensor:
    """``direct_backend`` on a plan read to the host (inference: nothing here records autograd)."""
    views = experts.per_expert(compute_dtype(x_TD))
    x_TD = x_TD.to(views[0][0].dtype)
    if plan.num_tokens == 1:
        return _one_token(experts, views, x_TD, plan)
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)  # fp32: a token sums several experts
    x_rows, out_rows = x_TD.split(1), out_TD.split(1)  # views, for the experts of one token
    for e, tokens, weights in zip(plan.experts, plan.tokens, plan.weights):
        w1, b1, w2, b2, w3, b3 = views[e]
        if len(tokens) == 1:
            t = tokens[0]
            _add_weighted(out_rows[t], _hidden(experts, x_rows[t], w1, b1, w3, b3), w2, b2, weights[0])
            continue
        # An expert's tokens are distinct and ascending: all of them is x itself.
        index = None if len(tokens) == plan.num_tokens else x_TD.new_tensor(tokens, dtype=torch.long)
        x_nD = x_TD if index is None else x_TD.index_select(0, index)
        y_nD = _linear(_hidden(experts, x_nD, w1, b1, w3, b3), w2, b2)
        weighted_nD = y_nD.float() * out_TD.new_tensor(weights).unsqueeze(1)
        if index is None:
            out_TD.add_(weighted_nD)
        else:
            out_TD.index_add_(0, index, weighted_nD)
    return out_TD


def _one_token(experts, views, x_1D: Tensor, plan: HostPlan) -> Tensor:
    """Decoding's call: every expert takes the one token, and the first one's GEMM makes the sum.

    This Python runs between GEMVs that stream each expert's weights through the caches and
    evict the interpreter's state, so each Python call costs several times what it costs in a
    loop (benchmarks/README.md, "Decoding"): the fp32 loop adds into the sum with no call between.
    """
    out_1D = None
    for e, (weight,) in zip(plan.experts, plan.weights):
        w1, b1, w2, b2, w3, b3 = views[e]
        h_1F = _hidden(experts, x_1D, w1, b1, w3, b3)
        if out_1D is None or h_1F.dtype != torch.float32:
            out_1D = _add_weighted(out_1D, h_1F, w2, b2, weight)
            continue
        out_1D.addmm_(h_1F, w2, alpha=weight)
        if b2 is not None:
            out_1D.add_(b2, alpha=weight)
    return out_1D


def _hidden(experts, x_nD: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor | None, b3: Tensor | None) -> Tensor:
    """One expert's activation on its rows: act(x w1 + b1), gated by x w3 + b3 for SwiGLU."""
    return experts.hidden(_linear(x_nD, w1, b1), None if w3 is None else _linear(x_nD, w3, b3))


def _add_weighted(out_1D: Tensor | None, h_1F: Tensor, w2: Tensor, b2: Tensor | None, weight: float) -> Tensor:
    """``out + weight * (h @ w2 + b2)`` in fp32, in ``out`` (None: a new one), in one GEMM where
    the operands are fp32."""
    if h_1F.dtype != torch.float32:  # a GEMM takes one dtype: compute, then add in fp32
        y_1D = _linear(h_1F, w2, b2)
        return y_1D.float().mul_(weight) if out_1D is None else out_1D.add_(y_1D, alpha=weight)
    if out_1D is None:
        return torch.mm(h_1F, w2).mul_(weight) if b2 is None else torch.addmm(b2, h_1F, w2, beta=weight, alpha=weight)
    out_1D.addmm_(h_1F, w2, alpha=weight)
    return out_1D if b2 is None else out_1D.add_(b2, alpha=weight)
