"""The "loop" backend, the plain reference: dispatch, one GEMM chain per expert, combine.

Every step is an ordinary differentiable torch op, so autograd writes the backward.

The weights are split once per call with ``unbind`` (not indexed as ``w[e]`` inside the loop,
whose backward would materialise a full [E, ...] gradient per expert), and the rows with
``split`` (whose backward is one ``cat``). Experts with no rows are skipped: ``unbind``'s
backward still hands them a zero gradient, so every parameter takes part in autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import combine, dispatch


def loop_backend(experts, x_TD: Tensor, plan) -> Tensor:
    return combine(_run_experts(experts, dispatch(x_TD, plan), plan), plan, x_TD.shape[0])


def _run_experts(experts, x_ND: Tensor, plan) -> Tensor:
    E = experts.num_experts
    w1, w2, w3, b1, b2, b3 = (
        _per_expert(p, E) for p in (experts.w1, experts.w2, experts.w3, experts.b1, experts.b2, experts.b3)
    )
    outputs = []
    for e, x_nD in enumerate(x_ND.split(plan.counts)):
        if x_nD.shape[0] == 0:
            continue
        up = _linear(x_nD, w1[e], b1[e])
        gate = _linear(x_nD, w3[e], b3[e]) if w3[e] is not None else None
        outputs.append(_linear(experts.hidden(up, gate), w2[e], b2[e]))
    if not outputs:
        return x_ND.new_empty(0, experts.w2.shape[-1])
    return torch.cat(outputs)


def _per_expert(param: Tensor | None, num_experts: int) -> tuple:
    return param.unbind(0) if param is not None else (None,) * num_experts


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)
