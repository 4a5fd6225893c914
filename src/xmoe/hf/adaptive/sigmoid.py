"""DeepSeek-V3-style routers: sigmoid scores, a bias for the choice only, group-limited top-k
(DeepSeek-V3 / R1 and Kimi-K2 as ``deepseek_v3``, GLM-4.5 / 4.6 as ``glm4_moe``, GLM-4.7-Flash
as ``glm4_moe_lite``).

The family's router, per token: ``s = sigmoid(W x)`` in fp32; it ranks the experts by ``s + b``
(``e_score_correction_bias``, a load-balancing correction that never enters the weights), keeps
the ``topk_group`` groups whose two best ``s + b`` sum highest, and picks the top k of ``s + b``
within them. It weighs the k by ``s`` normalised over them (``norm_topk_prob``; raw ``s``
otherwise), times ``routed_scaling_factor``.

A sigmoid score is no probability: the ``s`` of E experts do not sum to anything. The normalised
scores that exist are the family's weights of its k, ``q_j = s_j / (s_1 + ... + s_k)``: the share
of the routed output each of them carries. So the dial acts on the family's own choice: the k
experts are picked exactly as the family picks them (bias and groups included), ranked by q (the
weight they carry, not the biased score that chose them), and each token keeps the smallest
prefix whose share reaches t (at most ``max_experts <= k``). The kept experts are weighed by the
family's rule over the kept set: ``s`` renormalised over them when ``norm_topk_prob`` (so the
routed output keeps its scale), raw ``s`` otherwise, times ``routed_scaling_factor``. t >= 1 keeps
all k: the model itself. The shared experts run for every token, untouched.

Shape legend: T tokens, D model dim, E experts, G groups, K the family's k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Scores, ThresholdRouter, candidate_scores, renormalized


class GroupLimitedSigmoidThreshold(ThresholdRouter):
    own_top_k_only = True

    def candidates(self) -> int:
        return self.top_k

    def score(self, hidden_states: Tensor) -> Scores:
        x_TD = hidden_states.reshape(-1, self.hidden_dim).float()
        logits_TE = F.linear(x_TD, self.weight.float())  # fp32, as the family computes them
        s_TE = logits_TE.sigmoid()
        index_TK = self.family_choice(s_TE)
        s_TK = s_TE.gather(1, index_TK)
        return candidate_scores(logits_TE, s_TK, index_TK, renormalized(s_TK))

    def family_choice(self, s_TE: Tensor) -> Tensor:
        """The k experts the family picks: top k of ``s + bias`` within the ``topk_group`` groups
        whose two best ``s + bias`` sum highest."""
        choice_TE = s_TE + self.e_score_correction_bias
        T, E = choice_TE.shape
        group_TG = choice_TE.view(T, self.num_group, E // self.num_group).topk(2, dim=-1).values.sum(dim=-1)
        best_groups = group_TG.topk(self.topk_group, dim=-1).indices
        allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, best_groups, True)
        allowed_TE = allowed_TG.repeat_interleave(E // self.num_group, dim=1)
        return choice_TE.masked_fill(~allowed_TE, -torch.inf).topk(self.top_k, dim=-1).indices

    def weigh(self, value_TK: Tensor, index_TK: Tensor, scores: Scores) -> Tensor:
        # The family's 1e-20 keeps a row of underflowed sigmoids finite; kept for exactness.
        weights_TK = renormalized(value_TK, eps=1e-20) if self.norm_topk_prob else value_TK
        return weights_TK * self.routed_scaling_factor
