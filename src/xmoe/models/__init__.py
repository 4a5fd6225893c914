"""xmoe.models: Transformer models built on xmoe.moe and torch only (named configs: xmoe.presets).

    from xmoe.models import GPT
    from xmoe.presets import get_preset
    model = GPT(get_preset("debug-xmoe"))
    out = model(idx_BL, targets)        # out.logits_BLV, out.loss, out.aux_loss, out.stats
    loss = out.loss + 0.01 * out.aux_loss   # the training loop scales the aux loss, not the model

The configs (xmoe.models.config) and their parameter and FLOP counts (xmoe.models.counts)
import no torch; the names below are imported from their submodule when first used
(xmoe.lazy), so that the configs stay light.
"""

from xmoe.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": ("GPTConfig", "Seq2SeqConfig"),
    "counts": ("FlopsPerToken", "flops_breakdown", "flops_per_token"),
    "gpt": ("GPT", "IGNORE_INDEX", "GPTOutput", "moe_flops_per_token", "num_params"),
    "layers": ("Block", "FeedForward", "KVCache", "SelfAttention", "init_gpt2_"),
})
