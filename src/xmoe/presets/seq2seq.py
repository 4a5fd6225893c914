"""Translation presets: Transformer-base, a CPU size and a debug size, each dense and with the
paper's MT MoE family.

XMoE (Yang et al., 2024, arXiv 2403.18926, Sec. 4, docs/method.md "Machine translation"): MoE
replaces the FFN of encoder layers 2, 4, 6 of Transformer-base with 64 experts of width 1024,
threshold 0.9, capacity factor 2, against top-2 routing over the same experts.
``MT_PRESETS`` names functions returning a Seq2SeqConfig (``vocab_size=`` overrides the default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

from xmoe.models.config import Seq2SeqConfig
from xmoe.models.counts import moe_flops_budget, seq2seq_params
from xmoe.moe.config import MoEConfig

from .gpt import PresetRow, build, describe_moe

# Layout and default vocabulary of each size: Transformer-base, a CPU size, and a debug size
# that trains in seconds. MoE goes in encoder layers 2, 4, ... (Seq2SeqConfig's enc_moe_every=2).
SIZES = {
    "base": dict(vocab_size=32000, max_len=256, n_enc_layer=6, n_dec_layer=6, n_head=8, d_model=512, d_ff=2048, dropout=0.3),
    "cpu": dict(vocab_size=8000, max_len=128, n_enc_layer=3, n_dec_layer=3, n_head=4, d_model=256, d_ff=1024, dropout=0.1),
    "debug": dict(vocab_size=256, max_len=64, n_enc_layer=2, n_dec_layer=2, n_head=2, d_model=64, d_ff=128, dropout=0.0),
}


def dense(size: str, **kwargs) -> Seq2SeqConfig:
    """The dense model of ``size`` (a key of SIZES); ``kwargs`` override its fields (vocab_size)."""
    return Seq2SeqConfig(**(SIZES[size] | kwargs))


def mt_moe(router: str, num_experts: int, expert_dim: int, top_k: int, *, d_model: int) -> MoEConfig:
    """The paper's MT MoE layer: capacity factor 2 (min 4) in training, dropless in eval,
    threshold 0.9; ``top_k`` is the top-k router's k, or for XMoE the budget compared against."""
    return MoEConfig(
        model_dim=d_model, num_experts=num_experts, expert_dim=expert_dim, router=router, threshold=0.9,
        top_k=top_k, capacity_factor=2.0, eval_capacity_factor=None, min_capacity=4, activation="gelu",
        expert_bias=True, init_std=0.02,
    )


def with_moe(size: str, router: str, num_experts: int, expert_dim: int, top_k: int, **kwargs) -> Seq2SeqConfig:
    """The dense model of ``size`` with ``mt_moe`` in encoder layers 2, 4, ..."""
    cfg = dense(size, **kwargs)
    return dataclasses.replace(cfg, moe=mt_moe(router, num_experts, expert_dim, top_k, d_model=cfg.d_model))


def _family(size: str, num_experts: int) -> dict[str, Callable[..., Seq2SeqConfig]]:
    """Experts of width d_ff / 2: XMoE (t = 0.9) and top-2 over the same ``num_experts``, Switch
    over half as many experts of width d_ff (same parameters), and the dense model. Every top-k
    baseline activates one dense FFN's FLOPs per token; that is XMoE's budget (top_k = 2).
    Base: the paper's 64 x 1024."""
    n, d_ff = num_experts, SIZES[size]["d_ff"]
    w = d_ff // 2
    return {
        f"{size}-dense": partial(dense, size),
        f"{size}-xmoe-{n}x{w}": partial(with_moe, size, "threshold", n, w, 2),
        f"{size}-top2-{n}x{w}": partial(with_moe, size, "topk", n, w, 2),
        f"{size}-switch-{n // 2}x{d_ff}": partial(with_moe, size, "topk", n // 2, d_ff, 1),
    }


MT_PRESETS: dict[str, Callable[..., Seq2SeqConfig]] = {
    **_family("base", 64), **_family("cpu", 32), **_family("debug", 16),
}


def get_mt_preset(name: str, *, vocab_size: int | None = None) -> Seq2SeqConfig:
    """The config of MT preset ``name``; ``vocab_size`` overrides the preset's default."""
    return build(MT_PRESETS, name, what="translation", vocab_size=vocab_size)


def list_mt_presets() -> list[PresetRow]:
    """One row per translation preset, for ``xmoe presets``; parameters counted from the config
    (xmoe.models.counts), so no model is built and no torch imported."""
    rows = []
    for name in MT_PRESETS:
        cfg = get_mt_preset(name)
        experts = describe_moe(cfg.moe)
        if cfg.moe is not None:
            where = [f"{side} layers {', '.join(str(i + 1) for i in layers)}"
                     for side, layers in (("encoder", cfg.enc_moe_layer_indices),
                                          ("decoder", cfg.dec_moe_layer_indices)) if layers]
            experts += f" in {'; '.join(where)}"
        layers = f"{cfg.n_enc_layer}+{cfg.n_dec_layer} d{cfg.d_model}"
        rows.append(PresetRow(name, layers, experts, seq2seq_params(cfg), moe_flops_budget(cfg)))
    return rows
