"""xmoe.moe: the XMoE layer. Depends on torch only.

    from xmoe.moe import MoEConfig, MoELayer
    layer = MoELayer(MoEConfig(model_dim=768, num_experts=64, expert_dim=384, threshold=0.9))
    out = layer(x)                      # out.output, out.aux_loss, out.stats

The names below are imported from their submodule when first used (xmoe.lazy), so that
importing the config alone (xmoe.moe.config) costs no torch import.
"""

from xmoe.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "backends": ("BACKENDS", "Backend", "auto_backend"),
    "config": ("MoEConfig", "capacity"),
    "dial": ("Dial", "budget_dials", "step_budgets"),
    "dispatch": ("DispatchPlan", "Groups", "LocalDispatcher", "combine"),
    "experts": ("Experts", "ExpertWeights"),
    "layer": ("MoELayer", "MoEOutput", "set_threshold"),
    "losses": ("load_balancing_loss", "router_entropy", "router_z_loss"),
    "router": ("Router", "RouterOutput", "apply_capacity", "threshold_mask", "threshold_prefix", "topk_mask"),
    "stats": ("RoutingStats", "RoutingSummary", "routing_stats"),
})
