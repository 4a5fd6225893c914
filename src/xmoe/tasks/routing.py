"""What every task adds for its MoE layers: the loss terms it trains with, and the routing summary
it reports after an evaluation (XMoE's recipe, docs/method.md "Losses").

    loss = ce + aux_loss_coef * (sum over MoE layers of l_aux) + z_loss_coef * (sum of z-losses)
              + entropy_loss_coef * (sum of mean router entropies)

The last two are options beyond the paper, off by default (docs/method.md, "Deviations").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xmoe.moe import RoutingSummary
from xmoe.training.config import TrainConfig


def moe_objective(ce: Tensor, out: Any, cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to minimise and its logs, from a task's cross entropy ``ce`` and the model output
    ``out`` (``aux_loss``, ``z_loss``, ``entropy_loss``: summed over MoE layers; ``stats``: one
    RoutingStats per layer). The logs stay on the device: the loop reads them at its log steps."""
    loss = (ce + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss
            + cfg.entropy_loss_coef * out.entropy_loss)
    logs = {"loss": loss.detach(), "ce": ce.detach(), "aux_loss": out.aux_loss.detach(),
            "router_entropy": out.entropy_loss.detach()}
    if out.stats:
        logs["experts_per_token"] = torch.stack([s.kept_per_token for s in out.stats]).mean()
        logs["wanted_experts_per_token"] = torch.stack([s.wanted_per_token for s in out.stats]).mean()
        logs["dropped_token_fraction"] = torch.stack([s.dropped_token_fraction for s in out.stats]).mean()
    return loss, logs


def routing_summary(layers: Sequence[RoutingSummary], flops_per_token: float, topk_flops_per_token: float) -> dict:
    """An evaluation's routing, as both tasks report it: experts per token (mean over the MoE
    layers), expert FLOPs per token against the top-k model of equal parameters, and each
    layer's summary. Empty for a dense model."""
    if not layers:
        return {}
    per_layer = [layer.to_dict() for layer in layers]
    return {"experts_per_token": sum(layer["experts_per_token"] for layer in per_layer) / len(per_layer),
            "moe_flops_per_token": flops_per_token, "topk_moe_flops_per_token": topk_flops_per_token,
            "moe_flops_ratio": flops_per_token / topk_flops_per_token, "layers": per_layer}
