"""The "direct" backend, the small-T path: for a few tokens (decoding), each kept expert's GEMV
chain on its tokens, added straight into the output.

One token through one expert is two GEMVs that read the expert's weights once: the floor.
Everything else a layer call does is paid per call, not per token, and the other backends are
built to amortise it over thousands of tokens. This one does, per expert with pairs,

    out[t] += w_te * FFN_e(x_t)          for the tokens t of expert e (one GEMM chain)

and nothing else: no gather when the expert takes every token of the call (at T = 1, always),
no autograd Function.

At inference on a CPU, a call the host can decide does not reach this backend: the layer runs
the same GEMM chains from a plan made on the host (decode.py). Here the ops are plain
differentiable torch ops, so autograd writes the backward (tested against the float64 oracle,
and faster than the fused backend's up to 64 tokens; benchmarks/README.md). Weights are
indexed per expert (``w1[e]``, a view); when a weight gradient is wanted they are split once
with ``unbind`` instead, whose backward makes one [E, ...] gradient (indexing would make one
per expert: backends/loop.py).

Shapes: T tokens, D model dim, F expert dim, E experts, n one expert's pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..experts import compute_dtype
from .loop import _linear, per_expert


def direct_backend(experts, x_TD: Tensor, plan, dispatcher=None) -> Tensor:
    """The kept pairs of ``plan`` through their experts, weighted and summed per token: [T, D] fp32."""
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
