"""GPT presets: GPT-2 small, a CPU size and a debug size, each dense and with the paper's
parameter-matched MoE family, and the dense models split into experts (dense -> sparse, route 1).

XMoE (Yang et al., 2024, arXiv 2403.18926, Sec. 4 and docs/method.md, "The paper's
experiments"): MoE replaces the FFN of layers 2, 4, ..., 12 of GPT-2 small; the
parameter-matched family Switch 8x3072, top-k 16x1536 (k=2), top-k 64x384 (k=8), XMoE 16x1536,
32x768, 64x384 (t = 0.9), all about 323M parameters; LM capacity factor 8, minimum capacity 4.
``PRESETS`` names functions returning a GPTConfig (``vocab_size=`` overrides the default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from xmoe.errors import UsageError
from xmoe.models.config import GPTConfig
from xmoe.models.counts import flops_breakdown, gpt_params
from xmoe.moe.config import MoEConfig

T = TypeVar("T")

# The dense model of each size, with its default vocabulary (the trainer passes the tokenizer's):
# GPT-2 small (124M; GPT-2's vocabulary and dropout), a CPU size (a few million parameters with
# MoE, mostly in the experts; xmoe.data's default BPE size) and a debug size that trains in
# seconds on CPU (a tiny BPE).
SIZES = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, d_ff=3072, dropout=0.1),
    "cpu": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, d_model=256, d_ff=1024, dropout=0.1),
    "debug": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, d_model=64, d_ff=256, dropout=0.0),
}


def dense(size: str, **kwargs) -> GPTConfig:
    """The dense model of ``size`` (a key of SIZES); ``kwargs`` override its fields (vocab_size)."""
    return GPTConfig(**(SIZES[size] | kwargs))


def family_moe(router: str, num_experts: int, *, d_model: int, d_ff: int) -> MoEConfig:
    """The paper's parameter-matched MoE for a model whose dense FFN has width ``d_ff``.

    Experts of width ``8 * d_ff / num_experts``, so every variant holds the parameters of
    Switch 8 x d_ff; ``top_k = num_experts / 8``, so a top-k layer activates one dense FFN's
    FLOPs (Switch: 8 experts, k = 1). ``router="threshold"`` is XMoE at t = 0.9 (top_k is then
    only the budget that RoutingStats.flops_ratio compares against). LM capacity: factor 8,
    minimum 4 in training; dropless in eval. GeLU experts with biases, init N(0, 0.02).
    """
    if (8 * d_ff) % num_experts or num_experts % 8:
        raise UsageError(
            f"num_experts={num_experts} must be a multiple of 8 dividing 8 * d_ff={8 * d_ff} for a "
            f"parameter-matched expert width"
        )
    return MoEConfig(
        model_dim=d_model, num_experts=num_experts, expert_dim=8 * d_ff // num_experts, router=router,
        threshold=0.9, top_k=num_experts // 8, capacity_factor=8.0, eval_capacity_factor=None, min_capacity=4,
        activation="gelu", expert_bias=True, init_std=0.02,
    )


def with_moe(size: str, router: str, num_experts: int, **kwargs) -> GPTConfig:
    """The dense model of ``size`` with ``family_moe`` in layers 2, 4, ... (``moe_every=2``)."""
    cfg = dense(size, **kwargs)
    return dataclasses.replace(cfg, moe_every=2, moe=family_moe(router, num_experts, d_model=cfg.d_model, d_ff=cfg.d_ff))


def split_moe(num_experts: int, *, d_model: int, d_ff: int) -> MoEConfig:
    """A dense FFN of width ``d_ff`` split into ``num_experts`` experts of width d_ff / E: the
    paper's dense-model recipe (docs/method.md, "Dense models": 3072 -> 8 x 384, trained at t = 1.0,
    then t lowered at inference). t = 1 engages every expert (no capacity, so none is dropped) and
    the combine weights are the router probabilities, so the router learns how much each slice
    matters. ``top_k = E``: the FLOPs budget the statistics compare with is the whole dense FFN,
    so ``flops_ratio`` is the fraction of the dense FFN's FLOPs a token engages."""
    if d_ff % num_experts:
        raise UsageError(f"num_experts={num_experts} must divide d_ff={d_ff} to split the FFN evenly")
    return MoEConfig(
        model_dim=d_model, num_experts=num_experts, expert_dim=d_ff // num_experts, router="threshold",
        threshold=1.0, top_k=num_experts, capacity_factor=None, eval_capacity_factor=None, combine="probs",
        activation="gelu", expert_bias=True, init_std=0.02,
    )


def dense_split(size: str, num_experts: int, **kwargs) -> GPTConfig:
    """The dense model of ``size`` with every FFN (``moe_every=1``) split into ``num_experts``
    experts by ``split_moe``: the same FFN weights (plus a router and per-expert output biases)
    and, at t = 1, the same FFN FLOPs."""
    cfg = dense(size, **kwargs)
    return dataclasses.replace(cfg, moe_every=1, moe=split_moe(num_experts, d_model=cfg.d_model, d_ff=cfg.d_ff))


def _family(size: str) -> dict[str, Callable[..., GPTConfig]]:
    """The dense model of one size and its parameter-matched variants, named by experts x width."""
    d_ff = SIZES[size]["d_ff"]
    variants = (("switch", "topk", 8), ("topk", "topk", 16), ("topk", "topk", 64),
                ("xmoe", "threshold", 16), ("xmoe", "threshold", 32), ("xmoe", "threshold", 64))
    presets = {f"{size}-dense": partial(dense, size)}
    for label, router, experts in variants:
        presets[f"{size}-{label}-{experts}x{8 * d_ff // experts}"] = partial(with_moe, size, router, experts)
    return presets


PRESETS: dict[str, Callable[..., GPTConfig]] = {
    **_family("gpt2"),
    **_family("cpu"),
    "debug-dense": partial(dense, "debug"),
    "debug-switch": partial(with_moe, "debug", "topk", 8),
    "debug-topk": partial(with_moe, "debug", "topk", 16),
    "debug-xmoe": partial(with_moe, "debug", "threshold", 16),
    # Route 1 of dense -> sparse (named apart from the parameter-matched families above).
    **{f"split8-{size}": partial(dense_split, size, 8) for size in SIZES},
}


def get_preset(name: str, *, vocab_size: int | None = None) -> GPTConfig:
    """The config of preset ``name``; ``vocab_size`` overrides the preset's default."""
    return build(PRESETS, name, what="GPT", vocab_size=vocab_size)


def build(presets: dict[str, Callable[..., T]], name: str, *, what: str, vocab_size: int | None) -> T:
    """``presets[name]()``, or with ``vocab_size=`` when one is given; a ValueError naming the choices."""
    if name not in presets:
        raise UsageError(f"unknown {what} preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]() if vocab_size is None else presets[name](vocab_size=vocab_size)


@dataclass(frozen=True)
class PresetRow:
    """One line of ``xmoe presets``, for a GPT or a translation preset."""

    name: str
    layers: str  # e.g. "12 d768", "6+6 d512" (encoder + decoder)
    experts: str  # e.g. "dense", "8x3072 top-1", "64x384 t=0.9" (translation: and in which layers)
    params: int  # at the preset's default vocabulary
    moe_flops_per_token: float  # expert FLOPs per token over the MoE layers, top-k budget; 0 if dense
    flops_per_token: float | None = None  # all activated forward FLOPs per token, same budget (GPT)


def list_presets() -> list[PresetRow]:
    """One row per preset at its default vocabulary, for ``xmoe presets``."""
    rows = []
    for name in PRESETS:
        cfg = get_preset(name)
        fl = flops_breakdown(cfg)
        rows.append(PresetRow(name, f"{cfg.n_layer} d{cfg.d_model}", describe_moe(cfg.moe), gpt_params(cfg),
                              fl.experts, fl.total))
    return rows


def describe_moe(moe: MoEConfig | None) -> str:
    """E.g. "dense", "8x3072 top-1", "64x384 t=0.9": the experts and the routing rule."""
    if moe is None:
        return "dense"
    rule = f"t={moe.threshold:g}" if moe.router == "threshold" else f"top-{moe.top_k}"
    return f"{moe.num_experts}x{moe.expert_dim} {rule}"
