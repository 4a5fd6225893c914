"""Router losses: pure functions of the router's fp32 outputs.

load_balancing_loss is the auxiliary loss of XMoE (Switch style, on the top-1 choice only):

    l_aux = E * sum_e f_e * P_e

f_e: fraction of tokens whose most probable expert is e (before capacity; no gradient),
P_e: mean router probability of e. It equals 1 when both are uniform. The training loss adds
``0.01 * sum over MoE layers of l_aux`` (docs/method.md).

router_entropy is an option beyond the paper: the mean entropy of the router distribution, the
"dynamic loss" of top-p routing (Huang et al., 2024, "Harder Tasks Need More Experts", ACL).
Added with a positive coefficient it pushes each token's probabilities to a few experts, so
that the threshold rule engages fewer of them (docs/method.md, "Deviations").
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs_TE: Tensor) -> Tensor:
    """Unscaled Switch balancing loss of one layer; 0 for zero tokens."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum()  # 0, still attached to the graph
    top1_T = probs_TE.detach().argmax(dim=-1)  # ties: the lower expert index, as in routing
    counts_E = top1_T.new_zeros(num_experts).scatter_add_(0, top1_T, torch.ones_like(top1_T))  # bincount syncs on CUDA
    fraction_E = counts_E.to(probs_TE.dtype) / num_tokens
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * (fraction_E * mean_prob_E).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE's z-loss (Zoph et al., 2022): mean squared log-partition of the router logits.

    Keeps logits small so the fp32 softmax stays well conditioned; not part of XMoE's recipe,
    offered as an option (weight it yourself, 1e-3 in ST-MoE).
    """
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(logits_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy ``-sum_e p_e log p_e`` of ``p = softmax(logits)``, in nats.

    ln E for a uniform router, 0 for a one-hot one. From the logits (``log_softmax``), so a
    probability that underflows to 0 contributes 0, not NaN. 0 for zero tokens.
    """
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    log_p_TE = logits_TE.float().log_softmax(dim=-1)
    return -(log_p_TE.exp() * log_p_TE).sum(dim=-1).mean()
