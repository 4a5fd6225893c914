"""Expert parallelism: each rank holds E / ep of a layer's experts; tokens travel to them.

``AllToAllDispatcher`` is the layer's dispatcher under expert parallelism: the same three steps
as the local one (xmoe.moe.dispatch), with the ranks of an expert-parallel group in between.
One MoE layer call on one rank (its own micro-batch; routing, capacity and the balancing loss
stay local, as XMoE computes them per micro-batch):

    plan       kept pairs grouped by (global) expert, as locally; all_to_all of the [E] pair
               counts tells every rank how many rows it sends to and receives from each peer
    dispatch   all_to_all of x[token of each pair] (split sizes vary per step), then the
               received rows, which arrive grouped by source rank, regrouped by local expert
    experts    the local shard (a plain Experts module of L experts) on its rows, with any
               rows backend (xmoe.moe.backends)
    combine    rows back in the received order, all_to_all in reverse, and the weighted fp32
               scatter-add on the token's rank

The row exchanges are differentiable (the backward of an all_to_all is the all_to_all with the
split sizes swapped), so gradients reach the input, the router (through the combine weights)
and the experts. Every rows backend returns an output that depends on its input even when a
rank received no row, so every rank takes part in every backward exchange.

Host reads per call: one, as without parallelism: the counts this rank sends and the counts it
receives (exchanged on the device first) are read together.

Shapes: T tokens, D model dim, E experts (global), L local experts, N pairs this rank routes,
R rows this rank receives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from xmoe.moe import DispatchPlan, Experts, Groups, LocalDispatcher, MoEConfig, MoELayer, combine
from xmoe.moe.experts import PARAMS as EXPERT_PARAMS


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


@dataclass(frozen=True)
class ExchangePlan:
    """A local plan plus what the exchange needs: who sends how many rows to whom, and how the
    received rows are regrouped by local expert."""

    local: DispatchPlan  # this rank's kept pairs, grouped by global expert
    send: list[int]  # rows to each rank of the group
    recv: list[int]  # rows from each rank of the group
    order_R: Tensor  # received row of each position, sorted by local expert (stable)
    groups: Groups  # the received rows, grouped by local expert

    @property
    def read_along(self) -> tuple[int, ...]:
        return self.local.read_along


STATIC_ERROR = ("static_shapes=True cannot run under expert parallelism (the exchange sizes are read on "
                "the host); build the model with static_shapes=False")


class AllToAllDispatcher:
    """Sends each kept pair's row to the rank holding its expert, and the result back."""

    local = False  # no local backends: the rows cross ranks between gather and compute

    def __init__(self, *, num_experts: int, ep_rank: int, ep_size: int, group) -> None:
        self.num_experts, self.ep_rank, self.ep_size, self.group = num_experts, ep_rank, ep_size, group
        self.num_local = num_experts // ep_size
        self._local = LocalDispatcher()

    def plan(self, kept_TE: Tensor, weights_TE: Tensor, *, max_pairs: int | None = None,
             read_along: Tensor | None = None) -> ExchangePlan:
        if max_pairs is not None:
            raise ValueError(STATIC_ERROR)
        L, ep = self.num_local, self.ep_size
        counts_E = kept_TE.sum(dim=0)
        recv_counts = torch.empty_like(counts_E)  # [s * L + l]: rows rank s sends to my expert l
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        extra = recv_counts if read_along is None else torch.cat([recv_counts, read_along.reshape(-1).to(recv_counts)])
        local = self._local.plan(kept_TE, weights_TE, read_along=extra)  # the one host read
        recv_rows = [list(local.read_along[s * L : (s + 1) * L]) for s in range(ep)]
        local = dataclasses.replace(local, read_along=local.read_along[ep * L :])
        recv_SL = recv_counts.view(ep, L)
        send = [sum(local.counts[r * L : (r + 1) * L]) for r in range(ep)]
        recv = [sum(row) for row in recv_rows]

        expert_R = torch.arange(L, device=recv_SL.device).repeat(ep)
        total = sum(recv)  # given, so repeat_interleave does not read it back from a GPU
        expert_R = expert_R.repeat_interleave(recv_SL.flatten(), output_size=total)
        order_R = expert_R.argsort(stable=True)  # by local expert, then source rank, then arrival
        counts_L = tuple(map(sum, zip(*recv_rows)))
        offsets_L = recv_SL.sum(dim=0).cumsum(dim=0).to(torch.int32)
        groups = Groups(counts_L, offsets_L, expert_R[order_R], None)
        return ExchangePlan(local, send, recv, order_R, groups)

    def dispatch(self, x_TD: Tensor, plan: ExchangePlan) -> Tensor:
        """The rows this rank's experts compute, grouped by local expert: [R, D]."""
        x_ND = self._local.dispatch(x_TD, plan.local)
        x_RD = all_to_all(x_ND, plan.recv, plan.send, self.group)
        return x_RD.index_select(0, plan.order_R)

    def combine(self, y_RD: Tensor, plan: ExchangePlan) -> Tensor:
        """Results back to the ranks that sent the rows, then summed per token: [T, D] fp32."""
        y_arrival = torch.empty_like(y_RD).index_copy(0, plan.order_R, y_RD)
        y_ND = all_to_all(y_arrival, plan.send, plan.recv, self.group)
        return combine(y_ND, plan.local.token_idx_N, plan.local.weight_N, plan.local.num_tokens)

    def __repr__(self) -> str:
        first = self.ep_rank * self.num_local
        return f"AllToAllDispatcher(experts {first}..{first + self.num_local - 1} of {self.num_experts})"


def local_shard(full: Experts, cfg: MoEConfig, *, ep_rank: int, ep_size: int) -> Experts:
    """Experts ``[first, first + L)`` of ``full`` as an Experts module of their own.

    Parameters keep the names and layout of ``Experts`` (w1 [L, D, F], ...), so state-dict keys
    match a single-process model and a checkpoint is the shards concatenated along dim 0.
    """
    E = full.num_experts
    if E % ep_size:
        raise ValueError(
            f"{E} experts cannot be split evenly over an expert-parallel group of {ep_size} "
            f"ranks; choose --ep-size dividing {E}"
        )
    L = E // ep_size
    first = ep_rank * L
    with torch.random.fork_rng(devices=[]):  # its initialisation is overwritten: leave the RNG as it was
        shard = Experts(cfg, num_experts=L).to(device=full.w1.device, dtype=full.w1.dtype)
    with torch.no_grad():
        for name in EXPERT_PARAMS:
            if getattr(full, name) is not None:
                getattr(shard, name).copy_(getattr(full, name)[first : first + L])
    return shard


def shard_experts(model: nn.Module, *, ep_rank: int, ep_size: int, group) -> list[str]:
    """Replace the experts of every MoELayer in ``model`` by their local shard, in place.

    Returns the qualified names of the sharded parameters (what checkpoints gather along dim 0).
    """
    names = []
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoELayer) and layer.dispatcher.local:
            if layer.cfg.static_shapes:
                raise ValueError(STATIC_ERROR)
            E = layer.experts.num_experts
            layer.experts = local_shard(layer.experts, layer.cfg, ep_rank=ep_rank, ep_size=ep_size)
            layer.dispatcher = AllToAllDispatcher(num_experts=E, ep_rank=ep_rank, ep_size=ep_size, group=group)
            names += [f"{prefix}.experts.{n}" if prefix else f"experts.{n}"
                      for n in EXPERT_PARAMS if getattr(layer.experts, n) is not None]
    return names
