"""Expert parallelism: each rank holds E / ep of a layer's experts; tokens travel to them.

One MoE layer call on one rank (its own micro-batch; routing, capacity and the balancing loss
stay local, as XMoE computes them per micro-batch):

    route locally  ->  plan: kept pairs grouped by expert (dispatch.make_plan)
    exchange counts       all_to_all of the [E] pair counts: who sends how many rows to whom
    send rows             all_to_all of x[token of each pair], split sizes vary per step
    compute               the local experts on the rows they received, grouped by expert,
                          with the layer's own backend (each row its own "token", weight 1)
    send results back     all_to_all in reverse
    combine               weighted fp32 scatter-add on the token's rank (dispatch.combine)

The two row exchanges are differentiable (the backward of an all_to_all is the all_to_all with
the split sizes swapped), so gradients reach the input, the router (through the combine
weights) and the experts. Every rank runs every local expert, including experts that got no
rows (an empty slice still joins autograd), so gradient synchronisation never waits on a
missing gradient.

Shapes: T tokens, D model dim, E experts (global), L local experts, N pairs this rank routes,
R rows this rank receives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from xmoe.moe import DispatchPlan, Experts, MoELayer, combine, dispatch
from xmoe.moe.backends import get_backend

EXPERT_PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` go to the ranks of ``group``; ``recv`` rows arrive from each."""

    @staticmethod
    def forward(ctx, x: Tensor, recv: list[int], send: list[int], group) -> Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)  # gloo wants contiguous
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.send, ctx.recv, ctx.group), None, None, None


def all_to_all(x: Tensor, recv: list[int], send: list[int], group) -> Tensor:
    return _AllToAll.apply(x, recv, send, group)


class ExpertParallelExperts(nn.Module):
    """The local shard of an ``Experts`` module: experts ``[first, first + L)`` of E.

    Parameters keep the names and layout of ``Experts`` (w1 [L, D, F], ...), so state-dict keys
    match a single-process model and a checkpoint is the shards concatenated along dim 0.
    """

    def __init__(self, full: Experts, *, ep_rank: int, ep_size: int, group) -> None:
        super().__init__()
        E = full.num_experts
        if E % ep_size:
            raise ValueError(
                f"{E} experts cannot be split evenly over an expert-parallel group of {ep_size} "
                f"ranks; choose --ep-size dividing {E}"
            )
        self.num_global_experts, self.ep_rank, self.ep_size, self.group = E, ep_rank, ep_size, group
        L = E // ep_size
        self.first = ep_rank * L
        self.activation, self.backend = full.activation, full.backend
        for name in EXPERT_PARAMS:
            param = getattr(full, name)
            shard = None if param is None else nn.Parameter(param.detach()[self.first : self.first + L].clone())
            setattr(self, name, shard)

    @property
    def num_experts(self) -> int:
        """Local experts: what the backends iterate over."""
        return self.w1.shape[0]

    hidden = Experts.hidden  # the activation between the projections, as the full module computes it

    def forward(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        L, ep = self.num_experts, self.ep_size
        counts_E = torch.tensor(plan.counts, dtype=torch.int64, device=x_TD.device)
        # recv_counts[s, l]: rows rank s sends to my local expert l.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_SL = recv_counts.view(ep, L)
        recv_rows = recv_SL.tolist()  # a host read, like the layer's own pair counts
        send = [sum(plan.counts[r * L : (r + 1) * L]) for r in range(ep)]
        recv = [sum(row) for row in recv_rows]

        x_RD = all_to_all(dispatch(x_TD, plan), recv, send, self.group)  # grouped by source rank
        y_RD = get_backend(self.backend, self, x_RD)(self, x_RD, _local_plan(recv_SL, recv_rows))
        if x_RD.requires_grad and not y_RD.requires_grad:
            # No row arrived, and a backend returned a constant empty tensor: keep it in the graph,
            # or this rank would skip the backward exchanges its peers wait in.
            y_RD = y_RD + 0 * x_RD.sum()
        y_ND = all_to_all(y_RD.to(x_RD.dtype), send, recv, self.group)
        return combine(y_ND, plan, x_TD.shape[0])

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.num_experts - 1} of {self.num_global_experts}"


def _local_plan(recv_SL: Tensor, recv_rows: list[list[int]]) -> DispatchPlan:
    """Regroup received rows (source-major) by local expert; each row is its own output row.

    The backends gather ``token_idx_N`` rows and scatter-add ``weight_N * FFN(row)`` back to the
    same index, so with unit weights they return every row's expert output in place.
    """
    L = recv_SL.shape[1]
    experts = torch.arange(L, device=recv_SL.device).repeat(recv_SL.shape[0])
    total = sum(map(sum, recv_rows))  # given, so repeat_interleave does not read it back from a GPU
    expert_of_row = experts.repeat_interleave(recv_SL.flatten(), output_size=total)
    row_idx = expert_of_row.argsort(stable=True)  # by expert, then by source rank, then in order
    counts_L = recv_SL.sum(dim=0)
    return DispatchPlan(
        token_idx_N=row_idx,
        expert_idx_N=expert_of_row[row_idx],
        weight_N=torch.ones(row_idx.shape[0], device=recv_SL.device),
        counts=tuple(map(sum, zip(*recv_rows))),  # per local expert, from the host copy
        offsets_E=counts_L.cumsum(dim=0).to(torch.int32),
    )


def shard_experts(model: nn.Module, *, ep_rank: int, ep_size: int, group) -> list[str]:
    """Replace the experts of every MoELayer in ``model`` by their local shard, in place.

    Returns the qualified names of the sharded parameters (what checkpoints gather along dim 0).
    """
    names = []
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoELayer) and isinstance(layer.experts, Experts):
            layer.experts = ExpertParallelExperts(layer.experts, ep_rank=ep_rank, ep_size=ep_size, group=group)
            names += [f"{prefix}.experts.{n}" if prefix else f"experts.{n}"
                      for n in EXPERT_PARAMS if getattr(layer.experts, n) is not None]
    return names
