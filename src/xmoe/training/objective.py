"""The objective every task trains: its own cross entropy plus the weighted MoE losses (XMoE's
recipe, docs/method.md "Losses"), and the routing numbers logged with it at each step.

    loss = ce + aux_loss_coef * (sum over MoE layers of l_aux) + z_loss_coef * (sum of z-losses)
              + entropy_loss_coef * (sum of mean router entropies)

The last two are options beyond the paper, off by default (docs/method.md, "Deviations").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig


def moe_objective(ce: Tensor, out: Any, cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to minimise and its logs, from a task's cross entropy ``ce`` and the model output
    ``out`` (``aux_loss``, ``z_loss``, ``entropy_loss``: summed over MoE layers; ``stats``: one
    RoutingStats per layer)."""
    loss = (ce + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss
            + cfg.entropy_loss_coef * out.entropy_loss)
    logs = {"loss": loss.detach(), "ce": ce.detach(), "aux_loss": out.aux_loss.detach(),
            "router_entropy": out.entropy_loss.detach()}
    if out.stats:
        logs["experts_per_token"] = torch.stack([s.kept_per_token for s in out.stats]).mean()
        logs["wanted_experts_per_token"] = torch.stack([s.wanted_per_token for s in out.stats]).mean()
        logs["dropped_token_fraction"] = torch.stack([s.dropped_token_fraction for s in out.stats]).mean()
    return loss, logs
