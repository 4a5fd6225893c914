"""The (dp, ep) device mesh of a run and what the training loop asks of it.

Ranks form a ``DeviceMesh`` of ``dp`` rows and ``ep`` columns (rank = dp_rank * ep + ep_rank):

    mesh["ep"]        the ``ep`` ranks of one row: together they hold all E experts of every
                      MoE layer (E / ep each) and exchange tokens with all_to_all
    mesh["dp"]        the ``dp`` ranks of one column: replicas of the same experts
    world             the dense parameters (attention, norms, routers, embeddings)

Data parallelism comes in two implementations (``impl``):

    "fsdp"        (default) FSDP2: the dense parameters of each block (and the rest, at the
                  root) are sharded over the world with ``fully_shard``; each rank keeps 1 / W of
                  them, of their gradients and of their Adam state. Parameters are all-gathered
                  before a block's forward (and again before its backward when
                  ``reshard_after_forward``) and gradients reduce-scattered during backward.
    "allreduce"   every rank holds every dense parameter; one flat all_reduce of their gradients
                  after backward. Fewer, larger collectives: faster on small models and slow links
                  (benchmarks/README.md), at the price of replicated memory.

Experts are never FSDP-sharded when ``ep > 1``: expert parallelism shards them already (each
rank's shard holds different experts, which FSDP must not mix); their gradients are averaged
over their replicas, mesh["dp"], after backward, as the dense gradients are under "allreduce".
With ``ep = 1`` there is no expert sharding, and under "fsdp" experts are sharded like every
other parameter.

Every gradient is the mean over the global batch: summed over the ranks that saw a part of it
and divided by the world size (each rank's loss is a mean over its own tokens). An expert that
saw no token joins with zeros, never a missing gradient.

``Ranks`` is what the loop asks of a run; ``Parallel`` (one rank of a distributed run) and
``SingleProcess`` (a run of one, so the loop has no special case) are its two kinds.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from xmoe.moe import Router

from .experts import shard_experts

DP_IMPLS = ("fsdp", "allreduce")
DEFAULT_TIMEOUT_S = 600.0  # how long a collective waits for a rank that stopped answering


class RanksLost(RuntimeError):
    """Another rank of the run died or stopped answering; every rank stops."""


# How torch.distributed reports a peer that is gone: gloo's transport errors and timeouts come as
# plain RuntimeErrors, NCCL's as DistError; the words below are in each of them.
_LOST_PEER_MARKS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Timed out",
                    "timed out", "NCCL")


def lost_contact(err: BaseException) -> bool:
    """Whether ``err`` says a collective failed because a peer rank is gone (or hangs)."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError)
                                               and any(mark in str(err) for mark in _LOST_PEER_MARKS))


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

    @property
    def shape(self) -> tuple[int, int]:
        """The (dp, ep) shape of the device mesh."""
        return self.dp_size, self.ep_size

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, ep_rank) of ``rank``."""
        return divmod(rank, self.ep_size)

    def ep_groups(self) -> list[list[int]]:
        return [list(range(d * self.ep_size, (d + 1) * self.ep_size)) for d in range(self.dp_size)]

    def replica_groups(self) -> list[list[int]]:
        return [list(range(e, self.world_size, self.ep_size)) for e in range(self.ep_size)]


@dataclass(frozen=True, kw_only=True)
class DataParallelConfig:
    """How the dense parameters are kept in step across ranks (see the module docstring)."""

    impl: str = "fsdp"
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (less memory, one more all-gather)
    mixed_precision: bool = False  # fsdp: bf16 parameters in forward/backward, fp32 gradient reduction (GPU)

    def __post_init__(self) -> None:
        if self.impl not in DP_IMPLS:
            raise ValueError(f"train.dp_impl={self.impl!r} is not one of {', '.join(DP_IMPLS)}")


class Ranks(Protocol):
    """What the training loop and checkpoints ask of the processes of a run."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device | None  # where collectives of small numbers live; None: the loop resolves train.device

    def shard(self, model: nn.Module, dp: DataParallelConfig = ...) -> None: ...
    def batch_index(self, index: int) -> int: ...
    def sync_gradients(self, model: nn.Module) -> None: ...
    def clip(self, model: nn.Module, max_norm: float) -> Tensor: ...
    def sum(self, value: float) -> float: ...
    def sum_tensor(self, t: Tensor) -> Tensor: ...
    def broadcast(self, obj: Any) -> Any: ...
    def global_view(self, name: str, tensor: Tensor) -> Tensor: ...
    def rng_states(self) -> list[dict[str, Tensor]]: ...
    def barrier(self) -> None: ...


class SingleProcess(Ranks):
    """A run of one process: nothing to exchange, shard or reduce."""

    rank, world_size, is_main, device = 0, 1, True, None

    def shard(self, model: nn.Module, dp: DataParallelConfig = DataParallelConfig()) -> None:
        pass

    def batch_index(self, index: int) -> int:
        return index

    def sync_gradients(self, model: nn.Module) -> None:
        pass

    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        if max_norm <= 0:
            return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        return nn.utils.clip_grad_norm_(params, max_norm)

    def sum(self, value: float) -> float:
        return value

    def sum_tensor(self, t: Tensor) -> Tensor:
        return t

    def broadcast(self, obj: Any) -> Any:
        return obj

    def global_view(self, name: str, tensor: Tensor) -> Tensor:
        return tensor

    def rng_states(self) -> list[dict[str, Tensor]]:
        return [rng_state()]

    def barrier(self) -> None:
        pass


class Parallel(Ranks):
    """This process's place in a torch.distributed run of ``layout``.

    Build it after ``dist.init_process_group`` (``init_from_env`` does both under torchrun).
    ``shard`` then decides how the model is split (``DataParallelConfig``).
    """

    def __init__(self, layout: Layout, device: torch.device | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; launch with torchrun (xmoe train --nproc N)")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the process group has {dist.get_world_size()}")
        self.layout = layout
        self.device = device or torch.device("cpu")  # where collectives of small numbers live (NCCL: the GPU)
        self.rank, self.world_size = dist.get_rank(), layout.world_size
        self.is_main = self.rank == 0
        self.dp_rank, self.ep_rank = layout.coords(self.rank)
        # The groups are made here rather than by init_device_mesh so that they get the run's
        # collective timeout (init_device_mesh's get the backend's default, 10-30 minutes).
        timeout = datetime.timedelta(seconds=timeout_s)
        self.ep_group = _my_group(layout.ep_groups(), self.rank, timeout)
        self.replica_group = _my_group(layout.replica_groups(), self.rank, timeout)
        self.mesh = DeviceMesh.from_group([self.replica_group, self.ep_group], self.device.type,
                                          mesh=torch.arange(layout.world_size).view(layout.shape),
                                          mesh_dim_names=("dp", "ep"))
        self.dp = DataParallelConfig(impl="allreduce")  # until shard() says otherwise
        self.sharded: set[str] = set()  # expert parameters sharded by expert parallelism

    # --- model ----------------------------------------------------------------------------

    def shard(self, model: nn.Module, dp: DataParallelConfig = DataParallelConfig()) -> None:
        """Keep this rank's experts (when ep > 1), then shard the rest as ``dp.impl`` says."""
        self.dp = dp
        if self.layout.ep_size > 1:
            names = shard_experts(model, ep_rank=self.ep_rank, ep_size=self.layout.ep_size, group=self.ep_group)
            self.sharded = set(names)
        if dp.impl == "fsdp":
            experts = {p for name, p in model.named_parameters() if name in self.sharded}
            world = DeviceMesh(self.device.type, list(range(self.world_size)), mesh_dim_names=("world",))
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if dp.mixed_precision else MixedPrecisionPolicy())
            for block in transformer_blocks(model):  # children first, as fully_shard requires
                if dp.mixed_precision:  # routing runs on fp32 gates (Router.forward): gather them in fp32
                    for router in (m for m in block.modules() if isinstance(m, Router)):
                        fully_shard(router, mesh=world, reshard_after_forward=dp.reshard_after_forward,
                                    mp_policy=MixedPrecisionPolicy())
                fully_shard(block, mesh=world, reshard_after_forward=dp.reshard_after_forward, mp_policy=policy,
                            ignored_params={p for p in block.parameters() if p in experts})
            fully_shard(model, mesh=world, reshard_after_forward=dp.reshard_after_forward, mp_policy=policy,
                        ignored_params=experts)
            quiet_view_outputs(model)

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
        """Mean over the global batch: expert shards' gradients summed over their replicas, dense
        ones over the world (under fsdp, FSDP's reduce-scatter did that during backward), both
        divided by the world size."""
        dense, experts = self._split(model)
        if self.dp.impl == "allreduce":
            _average_grads(dense, None, self.world_size, self.world_size)
        _average_grads(experts, self.replica_group, self.layout.dp_size, self.world_size)

    def clip(self, model: nn.Module, max_norm: float) -> Tensor:
        """The global gradient norm (each parameter counted once, fp64), clipped as
        clip_grad_norm_ does; a 0-d tensor left on the device (nothing is read to the host).

        Dense gradients are whole on every rank (allreduce) or a 1 / W shard each (fsdp: summed
        over the world); an expert shard is summed over its expert-parallel group."""
        dense, experts = self._split(model)
        expert_sq = _sum_sq(experts, self.device)
        dist.all_reduce(expert_sq, group=self.ep_group)
        dense_sq = _sum_sq(dense, self.device)
        if self.dp.impl == "fsdp":
            dist.all_reduce(dense_sq)
        norm = (dense_sq + expert_sq).sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
            for p in dense + experts:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))  # x 1.0 where not clipped: exact
        return norm

    def sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return type(value)(t.item())

    def sum_tensor(self, t: Tensor) -> Tensor:
        """``t`` summed over every rank, in one all_reduce on the collectives' device; returned on
        ``t``'s device (``t`` itself is left as it was)."""
        summed = t.to(self.device, copy=True)
        dist.all_reduce(summed)
        return summed.to(t.device)

    # --- checkpoints ----------------------------------------------------------------------

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a small picklable object)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def global_view(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (a parameter, or optimizer state of one, named ``name``) as a tensor of the
        whole run: an expert shard becomes a DTensor sharded over mesh["ep"] and replicated over
        mesh["dp"] (a view: nothing is copied), so torch.distributed.checkpoint writes each expert
        once and can split it again for any number of ranks. Anything else is returned as is
        (FSDP's parameters are DTensors already; allreduce's dense ones are replicated)."""
        if name not in self.sharded or isinstance(tensor, DTensor) or tensor.ndim == 0:
            return tensor
        return DTensor.from_local(tensor, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def rng_states(self) -> list[dict[str, Tensor]]:
        """Every rank's RNG states (CPU, and its CUDA device when CUDA is in use), on every rank."""
        states: list = [None] * self.world_size
        dist.all_gather_object(states, rng_state())
        return states

    def barrier(self) -> None:
        dist.barrier()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: the elements of the outermost ``nn.ModuleList``s
    (a GPT's blocks; an encoder's and a decoder's layers) that hold parameters."""
    blocks, inside = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in inside):
            inside.add(name)
            blocks += [m for m in module if any(True for _ in m.parameters())]
    return blocks


def reshard(model: nn.Module) -> None:
    """Free the parameters FSDP gathered and kept (``reshard_after_forward=False`` keeps them after
    a forward until the backward that follows; an evaluation has none): back to 1 / W per rank."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def rng_state() -> dict[str, Tensor]:
    """This process's RNG states: CPU, and its CUDA device's when CUDA is in use."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # not is_available(): that would start CUDA in a CPU run
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def init_from_env(ep_size: int, device: str = "auto", *,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Parallel, torch.device]:
    """Join the run torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment).

    ``device`` is the run's train.device: "cpu" runs gloo on the CPU; "cuda" runs NCCL with one
    GPU per local rank; "auto" is "cuda" when CUDA is available, else "cpu". Asking for more
    local ranks than this machine has GPUs is an error, never a silent fallback. ``timeout_s``
    bounds how long any collective waits for a rank that died or hangs (train.collective_timeout_s).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("not launched by torchrun (RANK/WORLD_SIZE unset); use `xmoe train --nproc N`")
    if not 0 < timeout_s < math.inf:
        raise ValueError(f"the collective timeout must be a positive number of seconds, got {timeout_s!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    device_type = rank_device_type(device)
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if local_ranks > torch.cuda.device_count():
            raise ValueError(
                f"{local_ranks} processes on this machine need {local_ranks} GPUs, torch sees "
                f"{torch.cuda.device_count()}: use --nproc {torch.cuda.device_count()} or --train.device=cpu"
            )
        rank_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(rank_device)
        dist.init_process_group("nccl", device_id=rank_device, timeout=timeout)
    else:
        rank_device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    layout = Layout(world_size=dist.get_world_size(), ep_size=ep_size)
    return Parallel(layout, rank_device, timeout_s=timeout_s), rank_device


def rank_device_type(device: str) -> str:
    """"cuda" or "cpu" for a train.device setting (auto, cpu, cuda, cuda:N)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"distributed runs take train.device auto, cpu or cuda, not {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r}, but this torch sees no CUDA GPU; use --train.device=cpu")
    return device_type


def _my_group(groups: list[list[int]], rank: int, timeout: datetime.timedelta):
    """This rank's group among ``groups``; new_group is collective: every rank creates every
    group, in the same order."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks, timeout=timeout)
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
    """Sum of squared gradients in fp64, on the device (no host read per parameter); of this
    rank's shard only for a DTensor gradient."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            total += grad.double().pow(2).sum()
    return total


def quiet_view_outputs(model: nn.Module) -> None:
    """Silence FSDP2's warning that ``model``'s sharded modules return views: a linear layer's output
    on [B, L, D] input is one, and so is the MoE layer's reshaped output. An in-place op on such a
    view would skip the pre-backward all-gather; xmoe uses them out of place only (the residual
    adds, the loss), so the warning, printed by every rank, says nothing about these runs."""
    names = "|".join(sorted({re.escape(type(m).__name__) for m in model.modules() if isinstance(m, FSDPModule)}))
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \(({names})\) returned a view tensor",
                            category=UserWarning)

