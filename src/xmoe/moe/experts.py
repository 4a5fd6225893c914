"""The experts: E small feed-forward networks stored as stacked 3-D weights.

One layout serves every backend (``x @ w``, no transposes):

    w1 [E, D, F]   b1 [E, F]        up projection
    w3 [E, D, F]   b3 [E, F]        gate projection (SwiGLU only)
    w2 [E, F, D]   b2 [E, D]        down projection

    FFN_e(x) = act(x w1_e + b1_e) w2_e + b2_e          gelu, relu
    FFN_e(x) = (silu(x w1_e + b1_e) * (x w3_e + b3_e)) w2_e + b2_e    swiglu

The experts never see the router: backends run them on rows grouped by expert
(dispatch.Groups), as ScatterMoE's MLP takes routing as input (backends/).

Under autocast the expert matmuls run in the autocast dtype, and the fp32 weights are cast to
it once per optimizer step, not once per call (``weights``): the cast is kept until a weight
changes (its version counter moves, as every in-place update does: ``load_state_dict``,
``copy_`` under ``no_grad``), or any torch.optim optimizer steps. Writes through ``.data`` and
updates by hand outside an optimizer bypass both; call ``drop_cast_cache()`` after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .activations import activate
from .config import MoEConfig

PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")

# Optimizer steps taken in this process, counted from the first cached cast on: process-wide
# because torch.optim's step hook is (it fires for every torch.optim optimizer).
_steps = 0


def optimizer_steps() -> int:
    global _steps
    if _steps == 0:
        register_optimizer_step_post_hook(_count_step)
        _steps = 1
    return _steps


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1


@dataclass(frozen=True)
class ExpertWeights:
    """The experts' tensors in one dtype (the compute dtype), as backends read them."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    w3: Tensor | None
    b3: Tensor | None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert matmuls will run in on ``x``: autocast's, when it is on for x's
    device (every backend casts the weights to it with ``Experts.weights``)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Experts(nn.Module):
    def __init__(self, cfg: MoEConfig, num_experts: int | None = None) -> None:
        """The experts of ``cfg``; ``num_experts``: only this many (a shard, under expert parallelism)."""
        super().__init__()
        E, D, F_ = num_experts or cfg.num_experts, cfg.model_dim, cfg.expert_dim
        self.activation = cfg.activation
        self.init = cfg.init
        self.init_std = cfg.init_std
        self.w1 = nn.Parameter(torch.empty(E, D, F_))
        self.w2 = nn.Parameter(torch.empty(E, F_, D))
        self.w3 = nn.Parameter(torch.empty(E, D, F_)) if cfg.activation == "swiglu" else None
        bias = cfg.expert_bias
        self.b1 = nn.Parameter(torch.empty(E, F_)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, D)) if bias else None
        self.b3 = nn.Parameter(torch.empty(E, F_)) if bias and self.w3 is not None else None
        self.reset_parameters()
        self._cast: tuple | None = None  # (key, ExpertWeights) of the last cast
        self._views: tuple | None = None  # (key, per-expert views) of the last per_expert call

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert drawn independently (default), or, with ``init="identical"``, every expert
        a copy of the first, as the reference code's deep copies of one module are."""
        for w, b in ((self.w1, self.b1), (self.w3, self.b3), (self.w2, self.b2)):
            if w is None:
                continue
            if self.init_std is None:
                bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's default, fan_in = w.shape[1]
                nn.init.uniform_(w, -bound, bound)
                if b is not None:
                    nn.init.uniform_(b, -bound, bound)
            else:
                nn.init.normal_(w, std=self.init_std)
                if b is not None:
                    nn.init.zeros_(b)
            if self.init == "identical":
                w.copy_(w[:1].expand_as(w))
                if b is not None:
                    b.copy_(b[:1].expand_as(b))

    def forward(self, run, *args):
        """``run(self, *args)``, inside this module's call: a wrapper of the experts that changes
        their weights only while it is called (PEFT's LoRA on ``experts.w1`` and the others
        parametrizes them for the call) sees every use. MoELayer runs its backend this way."""
        return run(self, *args)

    def hidden(self, up: Tensor, gate: Tensor | None) -> Tensor:
        """The activation between the projections; ``gate`` is x w3 + b3 for SwiGLU."""
        return activate(self.activation, up, gate)

    def weights(self, dtype: torch.dtype) -> ExpertWeights:
        """The expert tensors in ``dtype``; a cast is made once and reused until a weight changes.

        A weight changes when its version counter moves (every in-place update) or an optimizer
        steps (fused optimizers update in place without moving it). The cached cast keeps its
        autograd link to the fp32 parameter (a cast saves nothing for backward, so several
        backward passes may run through it: the micro-batches of one step).
        """
        params = tuple(getattr(self, name) for name in PARAMS)
        if self.w1.dtype == dtype:
            return ExpertWeights(*params)

        def cast() -> ExpertWeights:
            return ExpertWeights(*(p.to(dtype) if p is not None else None for p in params))

        if torch.compiler.is_compiling() or self.w1.is_inference():  # no version counter to key on
            return cast()
        key = (dtype, torch.is_grad_enabled(), optimizer_steps(),
               tuple((p.data_ptr(), p._version, p.requires_grad) for p in params if p is not None))
        if self._cast is None or self._cast[0] != key:
            self._cast = None  # free the old cast before making the new one
            self._cast = (key, cast())
        return self._cast[1]

    def per_expert(self, dtype: torch.dtype) -> tuple[tuple[Tensor | None, ...], ...]:
        """Expert e's tensors in ``dtype``, ``(w1[e], b1[e], w2[e], b2[e], w3[e], b3[e])``, for
        every e: views of ``weights(dtype)``, made once and kept while those tensors stay the same.

        For reading without autograd (the small-T path, under ``torch.no_grad``): a decoding
        call runs a few experts, and indexing the stacked weights would cost an op per tensor
        per expert per call. The views are made without autograd, so they carry no gradient.
        Keyed on the tensors' addresses and shapes: the kept views keep their storage alive, so a
        tensor made after them (a new cast, a parameter's new ``.data``) cannot take the same
        address, and one that is a slice of the old (fewer experts) has another shape.
        """
        # Called between GEMMs that stream weights through the caches: no Python call it can avoid
        # (nn.Module.__getattr__, comprehensions). A plain Experts holds its tensors as parameters;
        # a subclass or a parametrization (PEFT's LoRA) may compute them on access.
        if type(self) is Experts:
            tensors = tuple(map(self._parameters.get, PARAMS))
        else:
            tensors = tuple([getattr(self, name) for name in PARAMS])
        if tensors[0].dtype != dtype:
            w = self.weights(dtype)
            tensors = (w.w1, w.b1, w.w2, w.b2, w.w3, w.b3)
        key = []
        for t in tensors:
            key.append(None if t is None else (t.data_ptr(), t.shape))
        if self._views is None or self._views[0] != key:
            with torch.no_grad():
                split = [(None,) * self.num_experts if t is None else t.unbind(0) for t in tensors]
            self._views = (key, tuple(zip(*split)))
        return self._views[1]

    def drop_cast_cache(self) -> None:
        self._cast = self._views = None

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle: a cast is not state
        return {**self.__dict__, "_cast": None, "_views": None}

    def _apply(self, fn, recurse=True):
        self._cast = self._views = None  # .to(), .cuda(), .half() ... make new parameters
        return super()._apply(fn, recurse)
