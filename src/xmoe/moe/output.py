"""MoEOutput: what a layer call returns, its output with the routing decision it came from, and
the router losses and statistics computed from that decision only when first read."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor

from .config import MoEConfig
from .losses import load_balancing_loss, router_entropy, router_z_loss
from .router import RouterOutput
from .stats import RoutingStats


@dataclass(frozen=True)
class MoEOutput:
    """A layer call's output, and its router losses and statistics, each computed when first read
    (then kept): a call whose losses and statistics nobody reads pays nothing for them."""

    output: Tensor  # same shape and dtype as the input
    decision: RouterOutput = field(repr=False)  # what the losses and statistics are computed from
    cfg: MoEConfig = field(repr=False)
    backend: str  # the backend that ran (what ``auto`` chose)

    @cached_property
    def stats(self) -> RoutingStats:
        """The call's routing statistics (each computed when read)."""
        d = self.decision
        return RoutingStats(d.probs_TE, d.wanted_TE, d.kept_TE, d.capacity, self.cfg, self.backend)

    @cached_property
    def aux_loss(self) -> Tensor:
        """fp32 scalar, the unscaled balancing loss; add 0.01 * aux_loss to the loss."""
        return load_balancing_loss(self.decision.probs_TE)

    @cached_property
    def z_loss(self) -> Tensor:
        """fp32 scalar, the router z-loss (optional; not in XMoE's recipe)."""
        return router_z_loss(self.decision.logits_TE)

    @cached_property
    def entropy_loss(self) -> Tensor:
        """fp32 scalar, mean router entropy (optional sharpening; not in XMoE's recipe)."""
        return router_entropy(self.decision.logits_TE)
