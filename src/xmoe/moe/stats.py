"""Routing statistics of one layer call: returned with the output, never kept in globals.

All fields are tensors on the layer's device, computed without gradient and without a host
sync; ``to_dict()`` fetches them (one sync) for logging. These are the numbers the reference
logs per layer and the paper's analyses use (docs/xmoe.md, "Statistics").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import MoEConfig

QUARTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class RoutingStats:
    num_tokens: int
    capacity: int | None  # slots per expert in this call; None when dropless
    wanted_per_token: Tensor  # mean experts a token asked for (before capacity)
    kept_per_token: Tensor  # mean experts a token got (after capacity)
    wanted_histogram: Tensor  # [E + 1]: tokens that asked for k experts, k = 0..E
    kept_histogram: Tensor  # [E + 1]: tokens that got k experts
    tokens_per_expert: Tensor  # [E]: kept pairs per expert
    dropped_pairs: Tensor  # wanted pairs that capacity dropped
    dropped_token_fraction: Tensor  # fraction of tokens that lost at least one pair
    top1_quartiles: Tensor  # [3]: 25/50/75% quantiles of each token's top-1 probability
    expert_flops_per_token: Tensor  # forward expert FLOPs actually computed, per token
    topk_flops_per_token: float  # the same for a top-k layer of these experts (k = cfg.top_k, at most E)

    @property
    def flops_ratio(self) -> Tensor:
        """Computed expert FLOPs relative to the top-k layer of equal parameters."""
        return self.expert_flops_per_token / self.topk_flops_per_token

    def to_dict(self) -> dict:
        """Plain Python numbers and lists, for logs and JSON."""
        out = {}
        for name, value in vars(self).items():
            out[name] = value.tolist() if isinstance(value, Tensor) else value
        out["flops_ratio"] = self.flops_ratio.item()
        return out


@torch.no_grad()
def routing_stats(
    probs_TE: Tensor, wanted_TE: Tensor, kept_TE: Tensor, capacity: int | None, cfg: MoEConfig
) -> RoutingStats:
    num_tokens, num_experts = probs_TE.shape
    wanted_T = wanted_TE.sum(dim=-1)
    kept_T = kept_TE.sum(dim=-1)
    if num_tokens:
        top1_T = probs_TE.max(dim=-1).values
        quartiles = torch.quantile(top1_T, torch.tensor(QUARTILES, device=top1_T.device))
    else:
        quartiles = probs_TE.new_full((len(QUARTILES),), float("nan"))
    return RoutingStats(
        num_tokens=num_tokens,
        capacity=capacity,
        wanted_per_token=_mean(wanted_T),
        kept_per_token=_mean(kept_T),
        wanted_histogram=count(wanted_T, num_experts + 1),
        kept_histogram=count(kept_T, num_experts + 1),
        tokens_per_expert=kept_TE.sum(dim=0),
        dropped_pairs=(wanted_T - kept_T).sum(),
        dropped_token_fraction=_mean(kept_T < wanted_T),
        top1_quartiles=quartiles,
        expert_flops_per_token=_mean(kept_T) * cfg.flops_per_pair,
        topk_flops_per_token=float(min(cfg.top_k, num_experts) * cfg.flops_per_pair),
    )


def count(values: Tensor, size: int) -> Tensor:
    """``bincount`` without its host syncs on CUDA (it reads min and max back to size the output)."""
    return values.new_zeros(size).scatter_add_(0, values, torch.ones_like(values))


def _mean(x: Tensor) -> Tensor:
    """Mean as fp32; 0 (not NaN) for an empty tensor."""
    return x.float().sum() / max(x.numel(), 1)


@dataclass
class RoutingSummary:
    """One layer's routing statistics summed over many calls (an evaluation, a sweep): token-
    weighted means, summed histograms and loads. ``add`` fetches each call's numbers to the
    host (one sync per call)."""

    tokens: int = 0
    kept_pairs: float = 0.0
    wanted_pairs: float = 0.0
    dropped_pairs: int = 0
    kept_histogram: Tensor | None = None
    tokens_per_expert: Tensor | None = None
    top1_quartiles_sum: Tensor | None = None

    def add(self, s: RoutingStats) -> None:
        n = s.num_tokens
        if n == 0:  # nothing routed (its quartiles are NaN)
            return
        self.tokens += n
        self.kept_pairs += float(s.kept_per_token) * n
        self.wanted_pairs += float(s.wanted_per_token) * n
        self.dropped_pairs += int(s.dropped_pairs)
        hist, per_expert = s.kept_histogram.cpu(), s.tokens_per_expert.cpu()
        self.kept_histogram = hist if self.kept_histogram is None else self.kept_histogram + hist
        self.tokens_per_expert = per_expert if self.tokens_per_expert is None else self.tokens_per_expert + per_expert
        q = s.top1_quartiles.cpu() * n
        self.top1_quartiles_sum = q if self.top1_quartiles_sum is None else self.top1_quartiles_sum + q

    def to_dict(self) -> dict:
        n = max(self.tokens, 1)
        return {
            "experts_per_token": self.kept_pairs / n,
            "wanted_per_token": self.wanted_pairs / n,
            "dropped_pairs": self.dropped_pairs,
            "experts_histogram": _list(self.kept_histogram),
            "tokens_per_expert": _list(self.tokens_per_expert),
            # The token-weighted mean of each call's quartiles (not the quartiles of all tokens).
            "top1_quartiles": _list(self.top1_quartiles_sum / n if self.top1_quartiles_sum is not None else None),
        }


def _list(t: Tensor | None) -> list:
    return t.tolist() if t is not None else []
