"""The "loop" backend, the plain reference: one GEMM chain per expert on its slice of rows
(the dispatcher gathers the rows and combines the results: backends/__init__.py).

Every step is an ordinary differentiable torch op, so autograd writes the backward.

The weights are split once per call with ``unbind`` (not indexed as ``w[e]`` inside the loop,
whose backward would materialise a full [E, ...] gradient per expert), and the rows with
``split`` (whose backward is one ``cat``). Experts with no rows are skipped: ``unbind``'s
backward still hands them a zero gradient, so every parameter takes part in autograd. With no
rows at all, the first expert runs on the empty input, so the (empty) output still depends on
the input and the weights: under expert parallelism a rank that received nothing must still
take part in the backward exchange.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..experts import compute_dtype


def loop_rows(experts, x_ND: Tensor, groups) -> Tensor:
    """[N, D] rows grouped by expert -> [N, D] expert outputs, in the compute dtype."""
    if groups.counts is None:
        raise ValueError("backend='loop' needs the per-expert counts on the host; static mode needs 'grouped_mm'")
    w = experts.weights(compute_dtype(x_ND))
    E = experts.num_experts
    w1, w2, w3, b1, b2, b3 = (per_expert(p, E) for p in (w.w1, w.w2, w.w3, w.b1, w.b2, w.b3))
    outputs = []
    for e, x_nD in enumerate(x_ND.split(groups.counts)):
        if x_nD.shape[0] or (e == E - 1 and not outputs):
            up = _linear(x_nD, w1[e], b1[e])
            gate = _linear(x_nD, w3[e], b3[e]) if w3[e] is not None else None
            outputs.append(_linear(experts.hidden(up, gate), w2[e], b2[e]))
    return torch.cat(outputs)


def per_expert(param: Tensor | None, num_experts: int, *, split: bool = True) -> Sequence:
    """``param[e]`` for each expert: the parameter's ``unbind`` (``split``), the parameter itself
    (indexing it makes a view: cheaper than E views, but no use for a gradient), or Nones."""
    if param is None:
        return (None,) * num_experts
    return param.unbind(0) if split else param


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)
