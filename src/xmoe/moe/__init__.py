"""xmoe.moe: the XMoE layer. Depends on torch only.

    from xmoe.moe import MoEConfig, MoELayer
    layer = MoELayer(MoEConfig(model_dim=768, num_experts=64, expert_dim=384, threshold=0.9))
    out = layer(x)                      # out.output, out.aux_loss, out.stats
"""

from .backends import BACKENDS, Backend, auto_backend
from .config import MoEConfig, capacity
from .dial import Dial, budget_dials, step_budgets
from .dispatch import DispatchPlan, Groups, LocalDispatcher, combine
from .experts import Experts, ExpertWeights
from .layer import MoELayer, MoEOutput, set_threshold
from .losses import load_balancing_loss, router_entropy, router_z_loss
from .router import Router, RouterOutput, apply_capacity, threshold_mask, threshold_prefix, topk_mask
from .stats import RoutingStats, RoutingSummary, routing_stats

__all__ = [
    "BACKENDS",
    "Backend",
    "Dial",
    "DispatchPlan",
    "ExpertWeights",
    "Experts",
    "Groups",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "RoutingSummary",
    "apply_capacity",
    "auto_backend",
    "budget_dials",
    "capacity",
    "combine",
    "load_balancing_loss",
    "router_entropy",
    "router_z_loss",
    "routing_stats",
    "set_threshold",
    "step_budgets",
    "threshold_mask",
    "threshold_prefix",
    "topk_mask",
]
