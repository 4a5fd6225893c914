"""Shared helpers for the xmoe.moe tests: building layers, running the oracle on a layer's own
weights, and collecting gradients. The oracle itself (helpers/oracle.py) knows nothing of xmoe."""

from __future__ import annotations

import torch
from hypothesis import settings

from helpers import oracle
from xmoe.moe import BACKENDS, MoEConfig, MoELayer, backends

# Small, deterministic property runs: CI must see the same examples every time.
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)

def _runs_on_cpu(name: str) -> bool:
    experts = MoELayer(MoEConfig(model_dim=8, num_experts=2, expert_dim=16)).experts
    return backends.get(name).problem(experts, torch.zeros(1, 8)) is None


# Every backend that runs on CPU tensors here (the Triton kernel only under TRITON_INTERPRET=1;
# its interpreter tests live in test_triton_moe.py), the small-T path that auto picks by size too.
CPU_BACKENDS = sorted(name for name in BACKENDS if _runs_on_cpu(name))

# Below this distance from a routing boundary, fp32 (library) and float64 (oracle) decisions
# could differ; fixed-seed cases assert they are further away than this.
MARGIN = 2e-6


def make_layer(seed: int = 0, **overrides) -> MoELayer:
    """A small layer; dims are multiples of 4 (fp32) and 8 (bf16) so grouped_mm can run it."""
    fields = dict(model_dim=8, num_experts=8, expert_dim=16)
    fields.update(overrides)
    torch.manual_seed(seed)
    return MoELayer(MoEConfig(**fields))


def params64(layer: MoELayer) -> oracle.Params:
    """float64 leaf copies of the layer's weights, requiring grad."""
    ex = layer.experts

    def copy(p):
        return None if p is None else p.detach().to(torch.float64).clone().requires_grad_(True)

    return oracle.Params(
        router=copy(layer.router.weight),
        w1=copy(ex.w1),
        w2=copy(ex.w2),
        w3=copy(ex.w3),
        b1=copy(ex.b1),
        b2=copy(ex.b2),
        b3=copy(ex.b3),
    )


def layer_params(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The layer's parameters under the oracle's names."""
    ex = layer.experts
    named = dict(router=layer.router.weight, w1=ex.w1, w2=ex.w2, w3=ex.w3, b1=ex.b1, b2=ex.b2, b3=ex.b3)
    return {k: v for k, v in named.items() if v is not None}


def run_oracle(layer: MoELayer, x_TD: torch.Tensor, P: oracle.Params | None = None, route_probs=None):
    """The oracle on the layer's weights and its *live* routing settings (threshold may have been
    changed after construction; train/eval picks the capacity factor)."""
    cfg, router = layer.cfg, layer.router
    P = params64(layer) if P is None else P
    x64 = x_TD if x_TD.dtype == torch.float64 else x_TD.detach().double()  # keeps a float64 leaf's graph
    return oracle.forward(
        x64,
        P,
        rule=cfg.router,
        threshold=router.threshold,
        top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor if layer.training else cfg.eval_capacity_factor,
        min_capacity=cfg.min_capacity,
        renormalize=cfg.renormalize,
        activation=cfg.activation,
        route_probs=route_probs,
        combine=cfg.combine,
        max_experts=cfg.max_experts,
    )


def oracle_routing(layer: MoELayer, x_TD: torch.Tensor, from_layer_probs: bool = False) -> oracle.Routing:
    """The oracle's decisions for x. ``from_layer_probs``: decide on the layer's own fp32
    probabilities (cast to float64) instead of the oracle's float64 ones, for random inputs that
    may sit on a boundary."""
    route_probs = None
    if from_layer_probs:
        with torch.no_grad():
            route_probs = layer.route(x_TD).probs_TE.double().tolist()
    with torch.no_grad():
        return run_oracle(layer, x_TD, route_probs=route_probs)[3]
