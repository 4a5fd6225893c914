"""Dispatch and combine: the pair of pure functions around the experts.

``make_plan`` lists the kept (token, expert) pairs grouped by expert; ``dispatch`` gathers the
tokens' rows in that order so every expert sees one contiguous slice; ``combine`` scatters the
expert outputs back, each multiplied by its combine weight, summing in fp32 (Eq. ``y = sum_e
p_e FFN_e(x)`` of XMoE). Nothing here is [T, E, C]-sized: memory follows the kept pairs, N.

Shapes: T tokens, D model dim, E experts, N kept pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Kept pairs sorted by expert, then by token. Built once per layer call; owns no weights."""

    token_idx_N: Tensor  # int64: the token of each pair
    expert_idx_N: Tensor  # int64: the expert of each pair (non-decreasing)
    weight_N: Tensor  # fp32 combine weight of each pair
    counts: tuple[int, ...]  # pairs per expert, on the host (slicing without a sync per expert)
    offsets_E: Tensor  # int32 end offset of each expert's group, on the device (grouped_mm)

    @property
    def num_pairs(self) -> int:
        return sum(self.counts)


def make_plan(kept_TE: Tensor, weights_TE: Tensor, counts_E: Tensor, counts: tuple[int, ...]) -> DispatchPlan:
    """Group the kept pairs by expert.

    ``counts_E`` is ``kept_TE.sum(0)`` on the device and ``counts`` the same numbers on the host;
    the caller fetches them in its one host sync, so nothing here waits on the device.
    """
    # Row-major nonzero of the [E, T] mask is exactly "by expert, then by token".
    pairs = torch.nonzero_static(kept_TE.T, size=sum(counts))
    expert_idx_N, token_idx_N = pairs.unbind(dim=1)
    weight_N = weights_TE[token_idx_N, expert_idx_N]
    offsets_E = counts_E.cumsum(dim=0).to(torch.int32)
    return DispatchPlan(token_idx_N, expert_idx_N, weight_N, tuple(counts), offsets_E)


def dispatch(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of ``x`` in plan order: [N, D]."""
    return x_TD.index_select(0, plan.token_idx_N)


def combine(y_ND: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """``out[t] = sum over pairs (t, e) of w_te * y_te``, accumulated in fp32: [T, D] fp32.

    fp32 because a token's output sums several experts' contributions, and bf16 additions
    would round each partial sum.
    """
    weighted_ND = y_ND.float() * plan.weight_N.unsqueeze(-1)
    out_TD = weighted_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, plan.token_idx_N, weighted_ND)
