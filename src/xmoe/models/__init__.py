"""xmoe.models: Transformer models built on xmoe.moe. Depends on xmoe.moe and torch only.

    from xmoe.models import GPT, get_preset
    model = GPT(get_preset("debug-xmoe"))
    out = model(idx_BL, targets)        # out.logits_BLV, out.loss, out.aux_loss, out.stats
    loss = out.loss + 0.01 * out.aux_loss   # the training loop scales the aux loss, not the model
"""

from .gpt import (
    GPT,
    IGNORE_INDEX,
    PRESETS,
    FlopsPerToken,
    GPTConfig,
    GPTOutput,
    PresetRow,
    family_moe,
    flops_breakdown,
    flops_per_token,
    get_preset,
    list_presets,
    moe_flops_per_token,
    num_params,
)
from .layers import Block, FeedForward, KVCache, SelfAttention, init_gpt2_

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "PRESETS",
    "Block",
    "FeedForward",
    "FlopsPerToken",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "PresetRow",
    "SelfAttention",
    "family_moe",
    "flops_breakdown",
    "flops_per_token",
    "get_preset",
    "init_gpt2_",
    "list_presets",
    "moe_flops_per_token",
    "num_params",
]
