"""The "fused" backend: gather -> expert MLP -> weighted scatter-add, one expert at a time.

Forward and backward work on one expert's rows at a time (a few hundred rows: cache-sized), so
no [N, D] gather, concatenation or product is ever materialised. On CPU that matters more than
it seems: a fresh 40 MB buffer costs more in first-touch page faults than the copy into it (see
benchmarks/README.md). Only what backward needs is stored: each pair's pre-activation [N, F]
(and gate, for SwiGLU) and expert output [N, D], the latter for the gradient of the combine
weights. The backward is written out by hand:

    y = act(x W1 + b1) W2 + b2          out[t] += w * y
    dw = <dout[t], y>                    dy = w * dout[t]
    dW2 = h^T dy    db2 = sum dy         dh = dy W2^T      da = act'(a) * dh
    dW1 = x^T da    db1 = sum da         dx[t] += da W1^T

Shapes: T tokens, D model dim, F expert dim, E experts, N kept pairs, n one expert's pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import activate, activate_backward
from .grouped import compute_dtype


def fused_backend(experts, x_TD: Tensor, plan) -> Tensor:
    params = (experts.w1, experts.b1, experts.w2, experts.b2, experts.w3, experts.b3)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, plan.weight_N, *params)
    )
    # mm/addmm with out= are not autocast ops: cast by hand to the dtype autocast would use, so
    # training and inference compute in the same precision; the casts carry gradients back.
    dtype = compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    params = tuple(p.to(dtype) if p is not None else None for p in params)
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return _FusedExperts.apply(
            x_TD, plan.weight_N, plan.token_idx_N, plan.counts, experts.activation, needs_grad, *params
        )


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_N, token_idx_N, counts, activation, save, w1, b1, w2, b2, w3, b3):
        num_pairs, (T, D), F_ = sum(counts), x_TD.shape, w1.shape[-1]
        out_TD = x_TD.new_zeros(T, D, dtype=torch.float32)  # fp32: a token sums several experts
        # Stored for backward only when a gradient is wanted; inference keeps per-expert scratch.
        up_NF = x_TD.new_empty(num_pairs, F_) if save else None
        gate_NF = x_TD.new_empty(num_pairs, F_) if save and w3 is not None else None
        y_ND = x_TD.new_empty(num_pairs, D) if save else None
        for e, rows in _spans(counts):
            tokens = token_idx_N[rows]
            x_nD = x_TD.index_select(0, tokens)
            up = _linear(x_nD, w1[e], b1, e, out=up_NF[rows] if save else None)
            gate = None
            if w3 is not None:
                gate = _linear(x_nD, w3[e], b3, e, out=gate_NF[rows] if save else None)
            y = _linear(activate(activation, up, gate), w2[e], b2, e, out=y_ND[rows] if save else None)
            # Weighted in place, on a copy only when y is kept for backward.
            out_TD.index_add_(0, tokens, y.to(torch.float32, copy=save).mul_(weight_N[rows, None]))
        if save:
            ctx.save_for_backward(x_TD, weight_N, token_idx_N, up_NF, gate_NF, y_ND, w1, b1, w2, b2, w3, b3)
            ctx.counts, ctx.activation = counts, activation
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        x_TD, weight_N, token_idx_N, up_NF, gate_NF, y_ND, w1, b1, w2, b2, w3, b3 = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        need = ctx.needs_input_grad
        # fp32, like the forward's combine: a token's input gradient sums several experts' parts.
        g_x = torch.zeros_like(x_TD, dtype=torch.float32) if need[0] else None
        g_weight = torch.zeros_like(weight_N) if need[1] else None
        # Weight gradients are written expert by expert; only the idle experts' slices need
        # zeros (zero-filling whole buffers costs more than it seems: first-touch page faults).
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]
        g_w1, g_b1, g_w2, g_b2, g_w3, g_b3 = (
            _weight_grad(p, idle) if p is not None and need[6 + i] else None
            for i, p in enumerate((w1, b1, w2, b2, w3, b3))
        )
        for e, rows in _spans(ctx.counts):
            tokens = token_idx_N[rows]
            g_out = grad_TD.index_select(0, tokens)  # [n, D] fp32
            y = y_ND[rows]
            if g_weight is not None:
                g_weight[rows] = (g_out * y.float()).sum(dim=-1)
            g_y = (g_out * weight_N[rows, None]).to(y.dtype)
            up, gate = up_NF[rows], gate_NF[rows] if gate_NF is not None else None
            if g_w2 is not None:
                torch.mm(activate(ctx.activation, up, gate).T, g_y, out=g_w2[e])
            if g_b2 is not None:
                torch.sum(g_y, dim=0, out=g_b2[e])
            g_up, g_gate = activate_backward(ctx.activation, g_y @ w2[e].T, up, gate)
            x_nD = x_TD.index_select(0, tokens) if g_w1 is not None or g_w3 is not None else None
            for g_pre, w, g_w, g_b in ((g_up, w1, g_w1, g_b1), (g_gate, w3, g_w3, g_b3)):
                if g_pre is None:
                    continue
                if g_w is not None:
                    torch.mm(x_nD.T, g_pre, out=g_w[e])
                if g_b is not None:
                    torch.sum(g_pre, dim=0, out=g_b[e])
                if g_x is not None:
                    g_x.index_add_(0, tokens, (g_pre @ w[e].T).float())
        g_x = g_x.to(x_TD.dtype) if g_x is not None else None
        return g_x, g_weight, None, None, None, None, g_w1, g_b1, g_w2, g_b2, g_w3, g_b3


def _weight_grad(param: Tensor, idle: list[int]) -> Tensor:
    grad = torch.empty_like(param)
    grad[idle] = 0
    return grad


def _spans(counts: tuple[int, ...]):
    """(expert, slice of its pairs) for every expert that has pairs."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, e: int, out: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(x, w, out=out) if out is not None else x @ w
    return torch.addmm(bias[e], x, w, out=out) if out is not None else torch.addmm(bias[e], x, w)
