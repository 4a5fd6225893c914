"""xmoe.models: Transformer models built on xmoe.moe and torch only (named configs: xmoe.presets).

    from xmoe.models import GPT
    from xmoe.presets import get_preset
    model = GPT(get_preset("debug-xmoe"))
    out = model(idx_BL, targets)        # out.logits_BLV, out.loss, out.aux_loss, out.stats
    loss = out.loss + 0.01 * out.aux_loss   # the training loop scales the aux loss, not the model
"""

from .gpt import (
    GPT,
    IGNORE_INDEX,
    FlopsPerToken,
    GPTConfig,
    GPTOutput,
    flops_breakdown,
    flops_per_token,
    moe_flops_per_token,
    num_params,
)
from .layers import Block, FeedForward, KVCache, SelfAttention, init_gpt2_

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "Block",
    "FeedForward",
    "FlopsPerToken",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "SelfAttention",
    "flops_breakdown",
    "flops_per_token",
    "init_gpt2_",
    "moe_flops_per_token",
    "num_params",
]
