"""gpt-oss: a softmax over the top-k logits only.

gpt-oss's router picks the k largest logits ``l = W x + b`` (with its bias) and weighs them by
``softmax(l over those k)``; the other experts get no probability at all. So the mass is that
weight, ``q_j = softmax(l_top-k)_j``, and the dial chooses among the family's own k: each token
keeps its experts with the largest q until their q reaches t (at most ``max_experts <= k``). The
kept experts are weighed by a softmax over their own logits, which is q renormalised over the
kept set: the family's rule applied to the experts that run. t >= 1 keeps all k: the model itself.

(A softmax over all E logits would be another distribution, one the model was never trained
to combine by; the weights it combines by are q.) The SwiGLU clamp and the expert biases are
the experts' own and run unchanged.

Shape legend: T tokens, E experts, K the family's k (then slots per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Scores, ThresholdRouter, candidate_scores, renormalized


class TopKSoftmaxThreshold(ThresholdRouter):
    own_top_k_only = True

    def candidates(self) -> int:
        return self.top_k

    def score(self, hidden_states: Tensor) -> Scores:
        logits_TE = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight, self.bias)
        top_TK, index_TK = logits_TE.topk(self.top_k, dim=-1)
        q_TK = F.softmax(top_TK, dim=-1, dtype=torch.float32)  # fp32 for the cumulative mass
        return candidate_scores(logits_TE, q_TK, index_TK, q_TK)

    def weigh(self, value_TK: Tensor, index_TK: Tensor, scores: Scores) -> Tensor:
        return renormalized(value_TK).to(scores.output_TE.dtype)
