"""The 2-D layout of a run (data-parallel x expert-parallel) and what the training loop asks of it.

Ranks form a grid of ``dp`` rows and ``ep`` columns (rank = dp_rank * ep + ep_rank):

    ep group          the ``ep`` ranks of one row: together they hold all E experts of every
                      MoE layer (E / ep each) and exchange tokens with all_to_all
    expert replicas   the ``dp`` ranks of one column: copies of the same experts
    world             every rank holds a copy of everything else (attention, norms, routers,
                      embeddings)

Every rank trains on its own micro-batches. After backward, gradients are averaged over the
global batch: the dense parameters' over the world, each expert shard's over its replicas only
(its gradient already sums the contributions of the whole ep group, which came back through
the exchange). One flat all_reduce per group per step; experts that saw no token contribute
zeros, never a missing gradient. Checkpoints are consolidated (shards gathered along dim 0), so
any number of ranks, or one process, can load them.

``Ranks`` is what the loop asks of a run; ``Parallel`` (one rank of a distributed run) and
``SingleProcess`` (a run of one, so the loop has no special case) are its two kinds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import shard_experts


@dataclass(frozen=True)
class Layout:
    """Which ranks share what, as plain rank lists (pure: testable without processes)."""

    world_size: int
    ep_size: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(
                f"--ep-size={self.ep_size} must be >= 1 and divide the number of processes "
                f"({self.world_size}); e.g. --ep-size {self.world_size}"
            )

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, ep_rank) of ``rank``."""
        return divmod(rank, self.ep_size)

    def ep_groups(self) -> list[list[int]]:
        return [list(range(d * self.ep_size, (d + 1) * self.ep_size)) for d in range(self.dp_size)]

    def replica_groups(self) -> list[list[int]]:
        return [list(range(e, self.world_size, self.ep_size)) for e in range(self.ep_size)]


class Ranks(Protocol):
    """What the training loop and checkpoints ask of the processes of a run."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device | None  # where collectives of small numbers live; None: the loop resolves train.device

    def shard(self, model: nn.Module) -> None: ...
    def batch_index(self, index: int) -> int: ...
    def sync_gradients(self, model: nn.Module) -> None: ...
    def clip(self, model: nn.Module, max_norm: float) -> float: ...
    def mean(self, values: dict[str, float]) -> dict[str, float]: ...
    def sum(self, value: int) -> int: ...
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]: ...
    def local_model_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def local_optimizer_state(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict: ...
    def rng_states(self) -> list[Tensor]: ...
    def barrier(self) -> None: ...


class SingleProcess(Ranks):
    """A run of one process: nothing to exchange, shard or reduce."""

    rank, world_size, is_main, device = 0, 1, True, None

    def shard(self, model: nn.Module) -> None:
        pass

    def batch_index(self, index: int) -> int:
        return index

    def sync_gradients(self, model: nn.Module) -> None:
        pass

    def clip(self, model: nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if max_norm <= 0:
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        return float(nn.utils.clip_grad_norm_(params, max_norm))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def sum(self, value: int) -> int:
        return value

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None

    def local_model_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return tensors

    def local_optimizer_state(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return state

    def rng_states(self) -> list[Tensor]:
        return [torch.get_rng_state()]

    def barrier(self) -> None:
        pass


class Parallel(Ranks):
    """This process's place in a torch.distributed run of ``layout``.

    Build it after ``dist.init_process_group`` (``init_from_env`` does both under torchrun).
    """

    def __init__(self, layout: Layout, device: torch.device | None = None) -> None:
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; launch with torchrun (xmoe train --nproc N)")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the process group has {dist.get_world_size()}")
        self.layout = layout
        self.device = device or torch.device("cpu")  # where collectives of small numbers live (NCCL: the GPU)
        self.rank, self.world_size = dist.get_rank(), layout.world_size
        self.is_main = self.rank == 0
        self.dp_rank, self.ep_rank = layout.coords(self.rank)
        # new_group is collective: every rank creates every group, in the same order.
        self.ep_group = _my_group(layout.ep_groups(), self.rank)
        self.replica_group = _my_group(layout.replica_groups(), self.rank)
        self.sharded: set[str] = set()

    # --- model ----------------------------------------------------------------------------

    def shard(self, model: nn.Module) -> None:
        """Keep this rank's experts. With ep = 1 experts stay whole (replicated, reduced like dense)."""
        if self.layout.ep_size > 1:
            names = shard_experts(model, ep_rank=self.ep_rank, ep_size=self.layout.ep_size, group=self.ep_group)
            self.sharded = set(names)

    def batch_index(self, index: int) -> int:
        """Micro-batch ``index`` of this rank: the global sequence interleaves the ranks, so W ranks
        with grad_accum g see exactly the micro-batches of one process with grad_accum g * W."""
        return index * self.world_size + self.rank

    # --- gradients ------------------------------------------------------------------------

    def _split(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        dense, experts = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (experts if name in self.sharded else dense).append(p)
        return dense, experts

    def sync_gradients(self, model: nn.Module) -> None:
        """Mean over the global batch: dense grads summed over the world, expert grads over their
        replicas, both divided by the world size (each rank's loss is a mean over its tokens)."""
        dense, experts = self._split(model)
        _average_grads(dense, None, self.world_size, self.world_size)
        _average_grads(experts, self.replica_group, self.layout.dp_size, self.world_size)

    def clip(self, model: nn.Module, max_norm: float) -> float:
        """The global gradient norm (each expert shard counted once), clipped as clip_grad_norm_ does."""
        dense, experts = self._split(model)
        expert_sq = _sum_sq(experts, self.device)
        dist.all_reduce(expert_sq, group=self.ep_group)
        norm = math.sqrt(float(_sum_sq(dense, self.device) + expert_sq))  # the step's one host read
        if max_norm > 0:
            scale = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
            if scale < 1.0:
                for p in dense + experts:
                    p.grad.mul_(scale)
        return norm

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def sum(self, value: int) -> int:
        return int(self._all_reduce_sum(float(value), None))

    def _all_reduce_sum(self, value: float, group) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return float(t)

    # --- checkpoints ----------------------------------------------------------------------

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        """Model and optimizer state with every shard gathered: the single-process layout.
        Collective: every rank must call it. Only the first dp row gathers (rank 0 is in it):
        the other rows hold copies of the same experts and return nothing."""
        if self.dp_rank != 0:
            return {}, None
        model_state = {name: self._gather(t) if name in self.sharded else t for name, t in model.state_dict().items()}
        if optimizer is None:
            return model_state, None
        state = optimizer.state_dict()
        full = {"param_groups": state["param_groups"], "state": {}}
        for index, name in self._optimizer_names(model, optimizer).items():
            entry = state["state"].get(index, {})
            full["state"][index] = {k: self._gather(v) if name in self.sharded and _per_param(v) else v
                                    for k, v in entry.items()}
        return model_state, full

    def local_model_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: self._slice(t) if name in self.sharded else t for name, t in tensors.items()}

    def local_optimizer_state(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        names = self._optimizer_names(model, optimizer)
        local = {"param_groups": state["param_groups"], "state": {}}
        for index, entry in state["state"].items():
            sharded = names.get(int(index)) in self.sharded
            local["state"][index] = {k: self._slice(v) if sharded and _per_param(v) else v for k, v in entry.items()}
        return local

    def rng_states(self) -> list[Tensor]:
        states: list = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return states

    def barrier(self) -> None:
        dist.barrier()

    def _gather(self, shard: Tensor) -> Tensor:
        if self.layout.ep_size == 1:
            return shard
        parts = [torch.empty_like(shard) for _ in range(self.layout.ep_size)]
        dist.all_gather(parts, shard.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def _slice(self, full: Tensor) -> Tensor:
        if full.shape[0] % self.layout.ep_size:
            raise ValueError(
                f"a checkpoint tensor with {full.shape[0]} experts cannot be split over --ep-size "
                f"{self.layout.ep_size}"
            )
        size = full.shape[0] // self.layout.ep_size
        return full[self.ep_rank * size : (self.ep_rank + 1) * size].clone()  # not a view: frees the rest

    @staticmethod
    def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """Optimizer state index -> parameter name (state_dict numbers params across groups)."""
        name_of = {id(p): n for n, p in model.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: name_of[id(p)] for i, p in enumerate(params)}


def init_from_env(ep_size: int, device: str = "auto") -> tuple[Parallel, torch.device]:
    """Join the run torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment).

    ``device`` is the run's train.device: "cpu" runs gloo on the CPU; "cuda" runs NCCL with one
    GPU per local rank; "auto" is "cuda" when CUDA is available, else "cpu". Asking for more
    local ranks than this machine has GPUs is an error, never a silent fallback.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("not launched by torchrun (RANK/WORLD_SIZE unset); use `xmoe train --nproc N`")
    kind = rank_device_type(device)
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if local_ranks > torch.cuda.device_count():
            raise ValueError(
                f"{local_ranks} processes on this machine need {local_ranks} GPUs, torch sees "
                f"{torch.cuda.device_count()}: use --nproc {torch.cuda.device_count()} or --train.device=cpu"
            )
        rank_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(rank_device)
        dist.init_process_group("nccl", device_id=rank_device)
    else:
        rank_device = torch.device("cpu")
        dist.init_process_group("gloo")
    layout = Layout(world_size=dist.get_world_size(), ep_size=ep_size)
    return Parallel(layout, rank_device), rank_device


def rank_device_type(device: str) -> str:
    """"cuda" or "cpu" for a train.device setting (auto, cpu, cuda, cuda:N)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"distributed runs take train.device auto, cpu or cuda, not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r}, but this torch sees no CUDA GPU; use --train.device=cpu")
    return kind


def _my_group(groups: list[list[int]], rank: int):
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def _average_grads(params: list[nn.Parameter], group, group_size: int, world_size: int) -> None:
    """grad <- (sum of grad over ``group``) / world_size, in one flat all_reduce.

    A parameter without a gradient (an expert no token reached) joins with zeros."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group_size > 1:
        dist.all_reduce(flat, group=group)
    flat /= world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def _sum_sq(params: list[nn.Parameter], device: torch.device) -> Tensor:
    """Sum of squared gradients in fp64, on the device (no host read per parameter)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            total += p.grad.double().pow(2).sum()
    return total


def _per_param(value) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0
