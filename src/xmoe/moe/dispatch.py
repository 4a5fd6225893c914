"""Dispatch and combine: moving tokens to their experts and the results back.

A dispatcher owns no parameters. It does three things for one layer call, and the layer calls
them in this order (layer.py):

    plan(decision)        which (token, expert) pairs run, grouped by expert: a DispatchPlan
    dispatch(x_TD, plan)  the rows the experts compute, grouped by expert: [N, D]
    combine(y_ND, plan)   ``out[t] = sum over kept pairs (t, e) of w_te * y_te``: [T, D] fp32
                          (the ``y = sum_e p_e FFN_e(x)`` of XMoE, summed in fp32)

``LocalDispatcher`` keeps every expert in this process. Expert parallelism has its own, with
the same three methods, that sends the rows to the ranks holding their experts
(xmoe.distributed.experts). Nothing here is [T, E, C]-sized: memory follows the kept pairs.

Host syncs: building a plan reads the per-expert pair counts to the host once (the layer's one
sync per call), because the experts' groups are sliced by them. In static mode it reads
nothing: the pairs are padded to a bound known from the shapes, and padding rows (after
``offsets_E[-1]``) carry weight 0 and are masked by whoever computes them.

Shapes: T tokens, D model dim, E experts, N kept pairs (or their static bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Groups:
    """Rows grouped by expert: what an expert backend needs besides the rows themselves."""

    counts: tuple[int, ...] | None  # rows per expert on the host; None in static mode
    offsets_E: Tensor  # int32 end offset of each expert's group, on the device
    expert_idx_N: Tensor  # int64 expert of each row (non-decreasing over the real rows)
    valid_N: Tensor | None  # static mode: True on real rows, False on padding; None otherwise


@dataclass(frozen=True)
class DispatchPlan:
    """Kept pairs sorted by expert, then by token. Built once per layer call."""

    token_idx_N: Tensor  # int64: the token of each pair (0 on padding rows)
    weight_N: Tensor  # fp32 combine weight of each pair (0 on padding rows)
    groups: Groups
    num_tokens: int
    read_along: tuple[int, ...] = ()  # the caller's values, fetched with the counts (see plan)

    @property
    def counts(self) -> tuple[int, ...] | None:
        return self.groups.counts


class LocalDispatcher:
    """Every expert lives in this process: dispatch is a gather, combine a scatter-add."""

    local = True  # the layer may hand the whole stage to a fused backend

    def plan(
        self, kept_TE: Tensor, weights_TE: Tensor, *, max_pairs: int | None = None,
        read_along: Tensor | None = None,
    ) -> DispatchPlan:
        """Group the kept pairs by expert.

        ``max_pairs``: static mode; pad to this many pairs instead of reading the counts (an
        upper bound on the kept pairs, or pairs are lost: MoELayer derives it from the router).
        ``read_along``: integers the caller needs on the host too (the layer's non-finite
        check, the received counts of expert parallelism), fetched in the same read as the
        counts, so they cost no sync of their own; ``plan.read_along`` holds them.
        """
        counts_E = kept_TE.sum(dim=0)
        offsets_E = counts_E.cumsum(dim=0, dtype=torch.int32)
        extra: tuple[int, ...] = ()
        if max_pairs is None:
            counts, extra = read_counts(counts_E, read_along)
            size, valid_N = sum(counts), None
        else:
            counts, size = None, max_pairs
        # Row-major nonzero of the [E, T] mask is exactly "by expert, then by token"; padding
        # rows (static mode) come last, filled with pair (0, 0).
        pairs = torch.nonzero_static(kept_TE.T, size=size, fill_value=0)
        expert_idx_N, token_idx_N = pairs.unbind(dim=1)
        weight_N = weights_TE[token_idx_N, expert_idx_N]
        if max_pairs is not None:
            valid_N = torch.arange(size, device=kept_TE.device) < offsets_E[-1]
            weight_N = torch.where(valid_N, weight_N, 0.0)
        groups = Groups(counts, offsets_E, expert_idx_N, valid_N)
        return DispatchPlan(token_idx_N, weight_N, groups, kept_TE.shape[0], extra)

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """Rows of ``x`` in plan order: [N, D]."""
        return x_TD.index_select(0, plan.token_idx_N)

    def combine(self, y_ND: Tensor, plan: DispatchPlan) -> Tensor:
        """Weighted scatter-add of the expert outputs back to their tokens: [T, D] fp32.

        fp32 because a token's output sums several experts' contributions, and bf16 additions
        would round each partial sum.
        """
        return combine(y_ND, plan.token_idx_N, plan.weight_N, plan.num_tokens)


def read_counts(counts_E: Tensor, read_along: Tensor | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The layer's one host sync: per-expert counts (the groups are sliced by them), and with
    them, in the same read, the integers of ``read_along``."""
    if read_along is None:
        return tuple(counts_E.tolist()), ()
    values = torch.cat([counts_E, read_along.reshape(-1)]).tolist()  # cat promotes to the counts' dtype
    E = counts_E.shape[0]
    return tuple(values[:E]), tuple(values[E:])


def combine(y_ND: Tensor, token_idx_N: Tensor, weight_N: Tensor, num_tokens: int) -> Tensor:
    """``out[t] = sum over rows n of token t of weight_N[n] * y_ND[n]``, in fp32: [T, D]."""
    weighted_ND = y_ND.float() * weight_N.unsqueeze(-1)
    out_TD = weighted_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, token_idx_N, weighted_ND)
