"""The "fused" backend: gather -> expert MLP -> weighted scatter-add, a few experts at a time.

A local backend: it gathers, computes and combines in one, with every expert in this process
(backends/__init__.py).

Forward and backward walk the experts in runs of consecutive experts holding at least
``CHUNK_BYTES`` of rows (a few experts at S1: cache-sized; one busy expert is a run of its own),
with one gather and one scatter-add per run, so no [N, D] gather, product or expert output is
ever materialised. On CPU that matters more than it seems: a fresh 40 MB buffer costs more in
first-touch page faults than the copy into it (see benchmarks/README.md). The only tensors kept
for backward are the
pre-activations [N, F] (and the gate, for SwiGLU): memory grows with the kept pairs at the
expert width, not the model width.

The combine weight is applied on the narrow side. For one pair (token t, expert e, weight w):

    a = act(x W1 + b1)                   out[t] += (w a) W2 + w b2

so the weighting multiplies an [n, F] activation instead of an [n, D] output; the weighted
bias is a rank-1 update of each expert's output rows. The backward, by hand, with g = dout[t]
and u = g W2^T (the gradient of the weighted activation w a):

    dw  = <u, a> + <g, b2>               dW2 = (w a)^T g          db2 = g^T w
    da  = w u     dup = act'(up) * da    dW1 = x^T dup            db1 = sum dup
    dx[t] += dup W1^T

Under autocast the weight is rounded to the compute dtype before it multiplies the activation
(``loop`` multiplies the output in fp32 instead): bf16 outputs are a little further from fp32
than ``loop``'s, well within bf16's own rounding (measured in benchmarks/README.md).

Shapes: T tokens, D model dim, F expert dim, E experts, N kept pairs, n one expert's pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import activate, activate_backward
from ..experts import compute_dtype

# The least a run gathers: 2 MB of [rows, D] (682 rows at S1), small enough to stay in cache and
# large enough to amortise a run's calls; runs of other sizes are timed in benchmarks/README.md.
CHUNK_BYTES = 2 << 20


def fused_backend(experts, x_TD: Tensor, plan, dispatcher=None) -> Tensor:
    """The kept pairs of ``plan`` through their experts, weighted and summed per token: [T, D] fp32."""
    if plan.counts is None:
        raise ValueError("backend='fused' needs the per-expert counts on the host; static mode needs 'grouped_mm'")
    # mm/addmm with out= are not autocast ops: cast by hand to the dtype autocast would use, so
    # training and inference compute in the same precision; the casts carry gradients back.
    dtype = compute_dtype(x_TD)
    w = experts.weights(dtype)
    params = (w.w1, w.b1, w.w2, w.b2, w.w3, w.b3)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, plan.weight_N, *params)
    )
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return _FusedExperts.apply(
            x_TD.to(dtype), plan.weight_N, plan.token_idx_N, plan.counts, experts.activation,
            needs_grad, *params,
        )


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_N, token_idx_N, counts, activation, save, w1, b1, w2, b2, w3, b3):
        num_pairs, (T, D), F_ = sum(counts), x_TD.shape, w1.shape[-1]
        out_TD = x_TD.new_zeros(T, D, dtype=torch.float32)  # fp32: a token sums several experts
        # Stored for backward only when a gradient is wanted; inference keeps per-expert scratch.
        up_NF = x_TD.new_empty(num_pairs, F_) if save else None
        gate_NF = x_TD.new_empty(num_pairs, F_) if save and w3 is not None else None
        weight_N1 = weight_N.to(x_TD.dtype).unsqueeze(1)
        for chunk, experts in _chunks(counts, _min_rows(x_TD)):
            tokens = token_idx_N[chunk]
            x_cD = x_TD.index_select(0, tokens)
            y_cD = x_cD.new_empty(x_cD.shape)
            for e, rows, local in experts:
                x_nD = x_cD[local]
                up = _linear(x_nD, w1[e], b1, e, out=up_NF[rows] if save else None)
                gate = _linear(x_nD, w3[e], b3, e, out=gate_NF[rows] if save else None) if w3 is not None else None
                hidden = activate(activation, up, gate).mul_(weight_N1[rows])
                y = torch.mm(hidden, w2[e], out=y_cD[local])
                if b2 is not None:
                    y.addr_(weight_N1[rows, 0], b2[e])  # + w b2
            out_TD.index_add_(0, tokens, y_cD.float())
        if save:
            ctx.save_for_backward(x_TD, weight_N, token_idx_N, up_NF, gate_NF, w1, b1, w2, b2, w3, b3)
            ctx.counts, ctx.activation = counts, activation
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        x_TD, weight_N, token_idx_N, up_NF, gate_NF, w1, b1, w2, b2, w3, b3 = ctx.saved_tensors
        need_x, need_weight, *_, need_w1, need_b1, need_w2, need_b2, need_w3, need_b3 = ctx.needs_input_grad
        grad_TD = grad_TD.contiguous()
        # fp32, like the forward's combine: a token's input gradient sums several experts' parts.
        g_x = torch.zeros_like(x_TD, dtype=torch.float32) if need_x else None
        g_weight = torch.empty_like(weight_N) if need_weight else None
        # Weight gradients are written expert by expert; only the idle experts' slices need
        # zeros (zero-filling whole buffers costs more than it seems on a CPU: first-touch page
        # faults).
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]
        g_w1, g_b1, g_w2, g_b2, g_w3, g_b3 = (
            _weight_grad(p, idle) if wanted else None
            for wanted, p in ((need_w1, w1), (need_b1, b1), (need_w2, w2), (need_b2, b2), (need_w3, w3), (need_b3, b3))
        )
        dtype = x_TD.dtype
        weight_N1 = weight_N.to(dtype).unsqueeze(1)
        for chunk, experts in _chunks(ctx.counts, _min_rows(x_TD)):
            tokens = token_idx_N[chunk]
            g_cD = grad_TD.index_select(0, tokens).to(dtype)
            x_cD = x_TD.index_select(0, tokens) if g_w1 is not None or g_w3 is not None else None
            g_x_cD = x_TD.new_empty(g_cD.shape) if g_x is not None else None
            for e, rows, local in experts:
                g = g_cD[local]
                up, gate = up_NF[rows], gate_NF[rows] if gate_NF is not None else None
                hidden = activate(ctx.activation, up, gate)
                g_hidden = g @ w2[e].T  # u: the gradient of the weighted activation w a
                if g_weight is not None:
                    dw = (g_hidden * hidden).sum(dim=-1, dtype=torch.float32)
                    g_weight[rows] = dw + (g @ b2[e]).float() if b2 is not None else dw
                if g_b2 is not None:
                    torch.mv(g.T, weight_N1[rows, 0], out=g_b2[e])
                if g_w2 is not None:
                    torch.mm(hidden.mul_(weight_N1[rows]).T, g, out=g_w2[e])
                g_up, g_gate = activate_backward(ctx.activation, g_hidden.mul_(weight_N1[rows]), up, gate)
                for g_pre, g_w, g_b in ((g_up, g_w1, g_b1), (g_gate, g_w3, g_b3)):
                    if g_pre is not None and g_w is not None:
                        torch.mm(x_cD[local].T, g_pre, out=g_w[e])
                    if g_pre is not None and g_b is not None:
                        torch.sum(g_pre, dim=0, out=g_b[e])
                if g_x_cD is not None:
                    g_x_nD = torch.mm(g_up, w1[e].T, out=g_x_cD[local])
                    if g_gate is not None:
                        g_x_nD.addmm_(g_gate, w3[e].T)
            if g_x is not None:
                g_x.index_add_(0, tokens, g_x_cD.float())
        g_x = g_x.to(x_TD.dtype) if g_x is not None else None
        return g_x, g_weight, None, None, None, None, g_w1, g_b1, g_w2, g_b2, g_w3, g_b3


def _weight_grad(param: Tensor, idle: list[int]) -> Tensor:
    if param.device.type != "cpu":
        return torch.zeros_like(param)  # a memset; indexing with a Python list would be a host sync
    grad = torch.empty_like(param)
    grad[idle] = 0
    return grad


def _min_rows(x_TD: Tensor) -> int:
    return max(1, CHUNK_BYTES // max(1, x_TD.shape[1] * x_TD.element_size()))


def _chunks(counts: tuple[int, ...], min_rows: int):
    """Runs of consecutive experts with at least ``min_rows`` pairs between them (the last run
    may have fewer, one busy expert many more), as ``(slice of the run's pairs, [(expert,
    slice of its pairs, slice of its rows inside the run)])``; idle experts are left out."""
    start = stop = 0
    members: list[tuple[int, slice, slice]] = []
    for e, n in enumerate(counts):
        if n:
            members.append((e, slice(stop, stop + n), slice(stop - start, stop - start + n)))
        stop += n
        if stop - start >= min_rows:
            yield slice(start, stop), members
            start, members = stop, []
    if members:
        yield slice(start, stop), members


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, e: int, out: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(x, w, out=out) if out is not None else x @ w
    return torch.addmm(bias[e], x, w, out=out) if out is not None else torch.addmm(bias[e], x, w)
