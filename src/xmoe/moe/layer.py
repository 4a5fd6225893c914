"""MoELayer: route -> plan -> dispatch, experts, combine (one backend), for any leading shape.

A drop-in replacement for a Transformer block's FFN. Only the (token, expert) pairs the router
kept are computed, so a threshold router that engages 3 of 64 experts costs 3/64 of the experts'
FLOPs, in wall time too. Every backend takes the same inputs (backends/__init__.py); ``auto``
picks one by device and size, the small-T path for decoding included.

Nothing is computed that nobody reads: the router losses and the statistics of a call are
computed when first read, so evaluation and decoding pay nothing for them.

Host syncs: one per call (the per-expert pair counts, read when the dispatcher plans; the
non-finite check rides on it), none per expert and none in backward. ``static_shapes=True``
has none at all: pairs are padded to a bound known from the shapes (Router.max_pairs).
A padding mask (``forward(x, mask)``) adds one, to select the real tokens. Decoding on a CPU
(eval, no grad, a few tokens) takes its own path first (decode.py): the probabilities are read
to the host (a memory read there, no sync), where the rule decides and the pairs are grouped by
expert, and each kept expert's GEMMs run on views of its weights: no mask, sort or scatter.

Shapes: T tokens, D model dim, E experts, N kept pairs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .backends import Backend, choice_key, choose
from .config import MoEConfig
from .decode import decode
from .dispatch import LocalDispatcher
from .experts import Experts
from .output import MoEOutput
from .router import Router, RouterOutput, non_finite_error


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg  # the config the layer was built with; see set_threshold for the live one
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.backend = cfg.backend  # a name; "auto" picks per input (backends.choose)
        self.dispatcher = LocalDispatcher()  # expert parallelism replaces it (xmoe.distributed)
        self._backends: dict[tuple, Backend] = {}  # backend_for's decisions

    @property
    def threshold(self) -> float:
        return self.router.threshold

    def set_threshold(self, threshold: float) -> None:
        """Change t of a built layer, e.g. at inference, where t is the compute dial."""
        self.router.threshold = threshold

    def route(self, x_TD: Tensor) -> RouterOutput:
        """The routing decision for [T, model_dim] tokens, for tests and analysis."""
        self._check_input(x_TD)
        decision = self.router(x_TD.reshape(-1, self.cfg.model_dim))
        if self._check_finite and not torch.isfinite(decision.logits_TE).all():
            raise non_finite_error()
        return decision

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MoEOutput:
        """Route and compute ``x`` [..., model_dim].

        ``mask`` (bool, shape ``x.shape[:-1]``, True = a real token) keeps padding out entirely:
        masked tokens are never routed, take no capacity and no compute, and enter neither the
        balancing loss nor the statistics; their output is 0 (the residual carries them).
        """
        if mask is None:
            decoded = decode(self, x)  # inference on a CPU, a few tokens (decode.py); None: not such a call
            if decoded is not None:
                return decoded
        self._check_input(x)
        if mask is not None:
            return self._forward_masked(x, mask)
        x_TD = x.reshape(-1, self.cfg.model_dim)
        backend = self.backend_for(x_TD)
        decision = self.router(x_TD)
        plan = self._plan(decision)
        y_TD = self.experts(backend.run, x_TD, plan, self.dispatcher)  # dispatch, experts, combine
        return MoEOutput(y_TD.to(x.dtype).reshape(x.shape), decision, self.cfg, backend.name)

    @property
    def base_experts(self) -> Experts:
        """The Experts module, also when a wrapper holds it as its ``base_layer`` (PEFT's LoRA on
        expert weights: the wrapper is called in its place, see Experts.forward)."""
        experts = self.experts
        while not isinstance(experts, Experts):
            experts = experts.base_layer
        return experts

    def backend_for(self, x: Tensor) -> Backend:
        """The backend this layer runs on ``x`` (what ``auto`` picks, or the named one, checked),
        decided once per kind of input: the checks are Python, and a GPU layer is launch-bound."""
        static, local = self.cfg.static_shapes, self.dispatcher.local
        if torch.compiler.is_compiling():
            return choose(self.backend, self.base_experts, x, static=static, local=local)
        key = (self.backend, *choice_key(x), local)
        if key not in self._backends:
            self._backends[key] = choose(self.backend, self.base_experts, x, static=static, local=local)
        return self._backends[key]

    def _plan(self, decision: RouterOutput):
        """The dispatcher's plan of the kept pairs: the call's one host read (none in static mode,
        which pads to a bound known from the shapes), with the non-finite check riding on it."""
        num_tokens = decision.kept_TE.shape[0]
        max_pairs = self.router.max_pairs(num_tokens) if self.cfg.static_shapes else None
        finite = torch.isfinite(decision.logits_TE).all() if self._check_finite else None
        plan = self.dispatcher.plan(decision.kept_TE, decision.weights_TE, max_pairs=max_pairs, read_along=finite)
        if finite is not None and not plan.read_along[-1]:
            raise non_finite_error()
        return plan

    @property
    def _check_finite(self) -> bool:
        """check_finite=None checks where it is free: everywhere but static mode (no host read)."""
        return self.cfg.check_finite is not False and not self.cfg.static_shapes

    def _forward_masked(self, x: Tensor, mask: Tensor) -> MoEOutput:
        if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} (the input without its last "
                f"dim, True for real tokens), got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        if self.cfg.static_shapes:
            raise ValueError(
                "a padding mask selects tokens, a host sync that static_shapes=True forbids; give the "
                "layer only real tokens, or build it with static_shapes=False"
            )
        x_TD = x.reshape(-1, self.cfg.model_dim)
        rows = mask.reshape(-1).nonzero().squeeze(1)  # a host sync, only when a mask is given
        inner = self.forward(x_TD.index_select(0, rows))
        out_TD = x_TD.new_zeros(x_TD.shape).index_copy(0, rows, inner.output)
        return dataclasses.replace(inner, output=out_TD.reshape(x.shape))

    def _check_input(self, x: Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.cfg.model_dim:
            raise ValueError(
                f"MoELayer expects inputs of shape [..., model_dim={self.cfg.model_dim}], got "
                f"{tuple(x.shape)}; check MoEConfig.model_dim against your model's hidden size"
            )
        if not x.is_floating_point():
            raise ValueError(f"MoELayer needs a floating-point input, got {x.dtype}")
        weight_dtype = self.base_experts.w1.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"input dtype {x.dtype} does not match the layer's parameter dtype {weight_dtype}: "
                f"convert the layer (layer.to({x.dtype})) or run under torch.autocast"
            )


def set_threshold(model: nn.Module, threshold: float) -> int:
    """Set t on every threshold-routed MoELayer inside ``model``; returns how many were set."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.router.kind == "threshold"]
    for layer in layers:
        layer.set_threshold(threshold)
    return len(layers)
