"""Fit the router of a converted FFN on calibration hidden states.

The router of the XMoE layer is ``p = softmax(W_g x)`` (Yang et al., 2024, arXiv 2403.18926,
Sec. 3; ``W_g`` [E, D], no bias), and the threshold rule engages the most probable experts until
their mass reaches t. For a converted dense FFN the natural target for p is the share of the
token's FFN output each group carries:

    q_e(x) = || h_{G_e}(x) w2[G_e, :] || / sum_e' || h_{G_e'}(x) w2[G_e', :] ||

(see ffn.py, equation (1)). W_g is fitted to minimise the cross-entropy ``-sum_e q_e log p_e``
averaged over calibration tokens (full batch, Adam), so that at threshold t a token engages the
groups predicted to carry a fraction t of the summed group-output norms. (MoEfication fits an MLP router to predict
each expert's activation sum; a linear softmax router is what XMoE's layer has.)

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xmoe.errors import UsageError, check_counts


@dataclass(frozen=True, kw_only=True)
class RouterFitConfig:
    steps: int = 300  # full-batch Adam steps
    lr: float = 0.02
    weight_decay: float = 0.0  # L2 on W_g, added to the loss
    seed: int = 0  # only for the initial weights (small random, so ties are broken)

    def __post_init__(self) -> None:
        check_counts("RouterFitConfig", steps=self.steps)
        if not self.lr > 0:
            raise UsageError(f"RouterFitConfig.lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise UsageError(f"RouterFitConfig.weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass(frozen=True)
class RouterFit:
    weight_ED: Tensor  # fp32 router weights, for Router.weight
    loss: float  # final mean cross-entropy against the targets
    entropy: float  # mean entropy of the targets: the loss a perfect router would reach
    top1_agreement: float  # fraction of tokens whose most probable expert is the top target group


def router_targets(contributions_TE: Tensor) -> Tensor:
    """Each row of group-contribution norms scaled to sum to 1 (uniform where all are 0)."""
    c_TE = contributions_TE.float()
    total_T1 = c_TE.sum(dim=1, keepdim=True)
    uniform_TE = torch.full_like(c_TE, 1.0 / c_TE.shape[1])
    return torch.where(total_T1 > 0, c_TE / total_T1.clamp_min(1e-30), uniform_TE)


def fit_router(x_TD: Tensor, targets_TE: Tensor, cfg: RouterFitConfig = RouterFitConfig()) -> RouterFit:
    """Linear softmax router ``W`` [E, D] minimising the cross-entropy to ``targets_TE``."""
    if x_TD.shape[0] != targets_TE.shape[0] or x_TD.shape[0] == 0:
        raise UsageError(f"fit_router needs as many (> 0) targets as tokens, got {targets_TE.shape[0]} and {x_TD.shape[0]}")
    x_TD, q_TE = x_TD.detach().float(), targets_TE.detach().float()
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    init_ED = torch.randn(q_TE.shape[1], x_TD.shape[1], generator=generator) * 1e-3
    w_ED = init_ED.to(x_TD.device).requires_grad_(True)
    optimizer = torch.optim.Adam([w_ED], lr=cfg.lr)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            loss = _cross_entropy(x_TD, w_ED, q_TE) + cfg.weight_decay * w_ED.pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        final = float(_cross_entropy(x_TD, w_ED, q_TE))
        entropy = float(-(q_TE * q_TE.clamp_min(1e-30).log()).sum(dim=1).mean())
        agree = float(((x_TD @ w_ED.T).argmax(dim=1) == q_TE.argmax(dim=1)).float().mean())
    return RouterFit(w_ED.detach(), final, entropy, agree)


def _cross_entropy(x_TD: Tensor, w_ED: Tensor, q_TE: Tensor) -> Tensor:
    return -(q_TE * F.log_softmax(x_TD @ w_ED.T, dim=1)).sum(dim=1).mean()
