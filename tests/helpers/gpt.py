"""Tiny GPT configs and a recorder of the MoE routing decisions made inside a forward pass."""

from __future__ import annotations

import contextlib

import torch

from xmoe.models import GPT, GPTConfig
from xmoe.moe import MoEConfig


def tiny_config(
    *, router: str | None = "threshold", n_layer: int = 4, moe_every: int = 2, dropout: float = 0.0,
    block_size: int = 32, **moe_kw
) -> GPTConfig:
    moe = None
    if router is not None:
        moe_kw = {"num_experts": 8, "expert_dim": 16, "threshold": 0.9, "top_k": 2, "init_std": 0.02} | moe_kw
        moe = MoEConfig(model_dim=32, router=router, **moe_kw)
    return GPTConfig(
        vocab_size=50, block_size=block_size, n_layer=n_layer, n_head=2, d_model=32, d_ff=64,
        dropout=dropout, moe_every=moe_every, moe=moe,
    )


def sharpen_routers(model: GPT, std: float = 1.0) -> None:
    """Larger router weights than the 0.02 init, so tokens pick different numbers of experts
    (with near-uniform probabilities, t = 0.9 engages almost every expert for every token)."""
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=std)


@contextlib.contextmanager
def record_routing(model: GPT):
    """Yield {MoE layer index: [RouterOutput of each call]}, filled by forward hooks on the
    routers: the decisions the forward pass really made."""
    calls: dict[int, list] = {i: [] for i in range(len(model.moe_layers()))}
    handles = [
        layer.router.register_forward_hook(lambda _m, _inp, out, i=i: calls[i].append(out))
        for i, layer in enumerate(model.moe_layers())
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def kept_BLE(calls: list, batch_size: int) -> torch.Tensor:
    """The kept-pair masks of successive calls on [B, L_i] inputs, joined along L: [B, L, E]."""
    return torch.cat([c.kept_TE.reshape(batch_size, -1, c.kept_TE.shape[-1]) for c in calls], dim=1)
