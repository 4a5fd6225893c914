"""Routers with a softmax over all E experts: OLMoE, FlexOlmo, Qwen2-MoE, Qwen3-MoE, Qwen3-Next,
Qwen3.5-MoE, Mixtral and Gemma-4.

The mass is the family's own probability ``p = softmax(router logits)`` over all E experts, in
fp32 as each family computes it, so the dial reads as XMoE's: each token keeps its most probable
experts until their probability reaches t (at most ``max_experts``, up to all E). The kept
experts are weighed as the family weighs its top k:

- ``p`` itself, or ``p`` renormalised over the kept set when ``config.norm_topk_prob`` (OLMoE,
  FlexOlmo, Qwen2-MoE, Qwen3-MoE, Qwen3-Next), cast to the router's dtype;
- always renormalised (Qwen3.5-MoE, cast to the router's dtype; Mixtral, kept in fp32);
- Gemma-4: renormalised, then times the router's learned ``per_expert_scale`` of each expert.

At ``max_experts = k`` and t >= 1 each token keeps the family's top k with the family's weights.
The shared expert (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE) runs for every token, untouched.

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Scores, ThresholdRouter, renormalized


class SoftmaxThreshold(ThresholdRouter):
    """OLMoE, FlexOlmo, Qwen2-MoE, Qwen3-MoE, Qwen3-Next: ``p`` renormalised if norm_topk_prob."""

    def renormalizes(self) -> bool:
        return bool(self.norm_topk_prob)

    def candidates(self) -> int:
        return self.num_experts

    def score(self, hidden_states: Tensor) -> Scores:
        logits_TE = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)  # fp32, as the family does
        return Scores(logits_TE, probs_TE, probs_TE)

    def weigh(self, value_TK: Tensor, index_TK: Tensor, scores: Scores) -> Tensor:
        weights_TK = renormalized(value_TK) if self.renormalizes() else value_TK
        return weights_TK.to(scores.output_TE.dtype)


class RenormalizedSoftmaxThreshold(SoftmaxThreshold):
    """Qwen3.5-MoE: always renormalised over the kept set (its router has no norm_topk_prob)."""

    def renormalizes(self) -> bool:
        return True


class MixtralThreshold(RenormalizedSoftmaxThreshold):
    """Mixtral: always renormalised, and its weights stay in fp32."""

    def weigh(self, value_TK: Tensor, index_TK: Tensor, scores: Scores) -> Tensor:
        return renormalized(value_TK)


class Gemma4Threshold(ThresholdRouter):
    """Gemma-4: the softmax of its scaled, RMS-normalised input; weights renormalised over the kept
    set, then scaled per expert. Its first output is the probabilities (not logits), as the family's."""

    def candidates(self) -> int:
        return self.proj.out_features

    def own_top_k(self) -> int:
        return self.config.top_k_experts

    def score(self, hidden_states: Tensor) -> Scores:
        x_TD = self.norm(hidden_states.reshape(-1, self.hidden_size)) * self.scale * self.scalar_root_size
        probs_TE = F.softmax(self.proj(x_TD), dim=-1, dtype=torch.float32)
        return Scores(probs_TE, probs_TE, probs_TE)

    def weigh(self, value_TK: Tensor, index_TK: Tensor, scores: Scores) -> Tensor:
        return renormalized(value_TK) * self.per_expert_scale[index_TK]
