"""Routing statistics of one layer call: returned with the output, never kept in globals.

Every statistic is a tensor on the layer's device, computed without gradient, without a host
sync, and only when read; ``to_dict()`` fetches them to the host for logging. These are the
numbers the reference logs per layer and the paper's analyses use (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .config import MoEConfig

QUARTILES = (0.25, 0.5, 0.75)

FIELDS = (
    "num_tokens", "capacity", "backend", "wanted_per_token", "kept_per_token", "wanted_histogram",
    "kept_histogram", "tokens_per_expert", "dropped_pairs", "dropped_token_fraction",
    "top1_quartiles", "expert_flops_per_token", "topk_flops_per_token",
)


class RoutingStats:
    """Routing statistics of one layer call, computed only when read.

    Holds references to the call's routing decision (its [T, E] probabilities and masks, alive
    as long as this object) and computes each statistic the first time it is read (then keeps
    it), so a forward pass whose statistics nobody reads pays nothing for them: not one kernel
    launch. Every statistic is a tensor on the layer's device (no host
    sync until you fetch it); ``to_dict()`` fetches them all.

        num_tokens              tokens routed in this call
        capacity                slots per expert; None when dropless
        backend                 the expert backend that ran (what ``auto`` chose)
        wanted_per_token        mean experts a token asked for (before capacity)
        kept_per_token          mean experts a token got (after capacity)
        wanted_histogram        [E + 1]: tokens that asked for k experts, k = 0..E
        kept_histogram          [E + 1]: tokens that got k experts
        tokens_per_expert       [E]: kept pairs per expert
        dropped_pairs           wanted pairs that capacity dropped
        dropped_token_fraction  fraction of tokens that lost at least one pair
        top1_quartiles          [3]: 25/50/75% quantiles of each token's top-1 probability
        expert_flops_per_token  forward expert FLOPs actually computed, per token
        topk_flops_per_token    the same for a top-k layer of these experts (k = cfg.top_k, <= E)
    """

    def __init__(
        self, probs_TE: Tensor, wanted_TE: Tensor, kept_TE: Tensor, capacity: int | None, cfg: MoEConfig,
        backend: str = "",
    ) -> None:
        self._probs_TE, self._wanted_TE, self._kept_TE, self._cfg = probs_TE.detach(), wanted_TE, kept_TE, cfg
        self.num_tokens, self.num_experts = probs_TE.shape
        self.capacity = capacity
        self.backend = backend
        self.topk_flops_per_token = float(min(cfg.top_k, self.num_experts) * cfg.flops_per_pair)

    @cached_property
    def _wanted_T(self) -> Tensor:
        return self._wanted_TE.sum(dim=-1)

    @cached_property
    def _kept_T(self) -> Tensor:
        return self._kept_TE.sum(dim=-1)

    @property
    def kept_T(self) -> Tensor:
        """[T]: the experts each token got (after capacity), for per-token analyses."""
        return self._kept_T

    @cached_property
    def wanted_per_token(self) -> Tensor:
        return _mean(self._wanted_T)

    @cached_property
    def kept_per_token(self) -> Tensor:
        return _mean(self._kept_T)

    @cached_property
    def wanted_histogram(self) -> Tensor:
        return count(self._wanted_T, self.num_experts + 1)

    @cached_property
    def kept_histogram(self) -> Tensor:
        return count(self._kept_T, self.num_experts + 1)

    @cached_property
    def tokens_per_expert(self) -> Tensor:
        return self._kept_TE.sum(dim=0)

    @cached_property
    def dropped_pairs(self) -> Tensor:
        return (self._wanted_T - self._kept_T).sum()

    @cached_property
    def dropped_token_fraction(self) -> Tensor:
        return _mean(self._kept_T < self._wanted_T)

    @cached_property
    def top1_quartiles(self) -> Tensor:
        probs_TE = self._probs_TE
        if self.num_tokens == 0:
            return probs_TE.new_full((len(QUARTILES),), float("nan"))
        # The quantile levels are built on the device: torch.tensor(list, device=cuda) would be
        # a host-to-device copy that waits for the GPU.
        levels = torch.arange(1, len(QUARTILES) + 1, device=probs_TE.device, dtype=probs_TE.dtype) / (len(QUARTILES) + 1)
        return torch.quantile(probs_TE.max(dim=-1).values, levels)

    @cached_property
    def expert_flops_per_token(self) -> Tensor:
        return self.kept_per_token * self._cfg.flops_per_pair

    @property
    def flops_ratio(self) -> Tensor:
        """Computed expert FLOPs relative to the top-k layer of equal parameters."""
        return self.expert_flops_per_token / self.topk_flops_per_token

    def to_dict(self) -> dict:
        """Plain Python numbers and lists, for logs and JSON."""
        out = {}
        for name in FIELDS:
            value = getattr(self, name)
            out[name] = value.tolist() if isinstance(value, Tensor) else value
        out["flops_ratio"] = self.flops_ratio.item()
        return out

    def __repr__(self) -> str:
        return f"RoutingStats(num_tokens={self.num_tokens}, capacity={self.capacity}, backend={self.backend!r})"


def routing_stats(
    probs_TE: Tensor, wanted_TE: Tensor, kept_TE: Tensor, capacity: int | None, cfg: MoEConfig, backend: str = ""
) -> RoutingStats:
    """The statistics of one call's routing decision (computed lazily, when read)."""
    return RoutingStats(probs_TE, wanted_TE, kept_TE, capacity, cfg, backend)


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
    host (a few small reads per call: for evaluations, not the training hot path)."""

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

    def to_tensor(self, num_experts: int) -> Tensor:
        """Every sum as one flat float64 host tensor (zeros where nothing was added), so that the
        summaries of several processes add up in one all_reduce; ``from_tensor`` reads it back.
        Counts stay exact in float64 (below 2**53)."""
        scalars = torch.tensor([self.tokens, self.kept_pairs, self.wanted_pairs, self.dropped_pairs],
                               dtype=torch.float64)
        sizes = _tensor_sizes(num_experts)[1:]
        tensors = (self.kept_histogram, self.tokens_per_expert, self.top1_quartiles_sum)
        return torch.cat([scalars] + [torch.zeros(n, dtype=torch.float64) if t is None else t.double()
                                      for t, n in zip(tensors, sizes)])

    @classmethod
    def from_tensor(cls, flat: Tensor, num_experts: int) -> RoutingSummary:
        """The summary ``to_tensor`` wrote (or the sum of several of them)."""
        scalars, histogram, per_expert, quartiles = flat.cpu().split(_tensor_sizes(num_experts))
        tokens, kept, wanted, dropped = scalars.tolist()
        if tokens == 0:  # nothing was added anywhere
            return cls()
        return cls(tokens=int(tokens), kept_pairs=kept, wanted_pairs=wanted, dropped_pairs=int(dropped),
                   kept_histogram=histogram.long(), tokens_per_expert=per_expert.long(),
                   top1_quartiles_sum=quartiles.float())

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


def _tensor_sizes(num_experts: int) -> list[int]:
    """RoutingSummary.to_tensor's parts: 4 scalars, the histogram, the loads, the quartiles."""
    return [4, num_experts + 1, num_experts, len(QUARTILES)]


def _list(t: Tensor | None) -> list:
    return t.tolist() if t is not None else []
