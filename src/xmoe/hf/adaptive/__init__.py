"""The threshold dial for pretrained MoE LLMs: ``adaptive(model, threshold=t)`` turns a loaded
transformers MoE model's top-k routing into XMoE's threshold rule (Yang et al. 2024, arXiv
2403.18926, Sec. 3.2) on that model's own normalised router scores, for inference, and runs its
experts with the "xmoe" implementation (hf/experts.py), which computes only the kept pairs.

The rule, per token: rank the candidate experts by the family's normalised score (its "mass",
summing to 1 over the candidates) in fp32; keep rank j when j = 1 or ``m(1) + ... + m(j-1) < t``
(the expert that makes the mass reach t is included), at most ``max_experts`` of them. ``t <= m(1)``
keeps one expert; ``t >= 1`` keeps ``max_experts`` (every candidate without a cap).

What the mass is, and how the kept experts are weighed, is each family's own (families.py;
docs/adaptive.md):

- a softmax over all E experts (OLMoE, FlexOlmo, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE,
  Mixtral, Gemma-4): the mass is that probability, every expert is a candidate (softmax.py);
- gpt-oss: a softmax over its top-k logits only; the candidates are its k (topk_softmax.py);
- DeepSeek-V3, GLM-4.5, GLM-4.7-Flash (Kimi-K2 loads as DeepSeek-V3): sigmoid scores of the k
  experts the family picks with its bias and group limit, normalised over those k (sigmoid.py).

The kept experts keep the family's weighting, so ``adaptive(model, threshold=1.0,
max_experts=k)`` with the model's own k keeps exactly its top-k with its weights: its logits equal
the unmodified model's up to fp32 rounding (tested per family).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from xmoe.errors import UsageError

from ..experts import EXPERTS_IMPLEMENTATION
from .base import ThresholdRouter, adapt_router, check_adaptable
from .families import FAMILIES, SUPPORTED_FAMILIES, family_of

__all__ = ["FAMILIES", "SUPPORTED_FAMILIES", "ExpertCounts", "adaptive", "experts_per_token", "histogram_mean",
           "is_adapted", "moe_blocks", "moe_routers", "own_top_k"]


def adaptive(model: nn.Module, *, threshold: float, max_experts: int | None = None) -> nn.Module:
    """Route every MoE block of ``model`` (a transformers causal LM of a family in
    ``SUPPORTED_FAMILIES``) by the threshold rule at ``threshold``, keeping at most
    ``max_experts`` experts per token (None: every candidate, see the module docstring), and
    compute its experts with the "xmoe" implementation. In place; returns ``model``, in eval mode
    (training it afterwards raises). Calling it again on an adapted model changes the threshold
    and the cap."""
    _check_threshold(threshold)
    routers = _routers_of(model)
    _check_max_experts(max_experts, routers[0])
    for router in routers:  # every check before any change
        check_adaptable(router)
    model.eval()
    for router in routers:
        adapt_router(router, family_of(router).rule, threshold=threshold, max_experts=max_experts)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return model


def own_top_k(model: nn.Module) -> int:
    """The k of ``model``'s own top-k routing (read from its first MoE router)."""
    router = _routers_of(model)[0]
    return family_of(router).rule.own_top_k(router)


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The routers of ``model``'s MoE blocks that a family in ``FAMILIES`` owns (adapted or not)."""
    return [m for m in model.modules() if family_of(m) is not None]


def _routers_of(model: nn.Module) -> list[nn.Module]:
    """``moe_routers``, or a UsageError saying why ``model`` has none."""
    routers = moe_routers(model)
    if not routers:
        raise UsageError(_unsupported(model))
    return routers


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules holding a family's router beside its ``experts`` (a sparse MoE block; for
    Gemma-4, the decoder layer)."""
    return [m for m in model.modules() if hasattr(m, "experts") and any(family_of(c) for c in m.children())]


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, ThresholdRouter) for m in model.modules())


@dataclass
class ExpertCounts:
    """Experts per token over every routed token of every MoE block: ``histogram[n]`` tokens
    engaged n experts (summed over blocks; n from 0 to E)."""

    histogram: list[int] = field(default_factory=list)

    def add(self, counts_T: Tensor, num_experts: int) -> None:
        self.histogram += [0] * (num_experts + 1 - len(self.histogram))
        for n, c in enumerate(torch.bincount(counts_T, minlength=num_experts + 1).tolist()):
            self.histogram[n] += c

    @property
    def mean(self) -> float:
        return histogram_mean(self.histogram)


def histogram_mean(histogram: list[int]) -> float:
    """Mean experts per (token, layer) pair of a histogram[n] = pairs that engaged n experts."""
    routed = sum(histogram)
    return sum(n * c for n, c in enumerate(histogram)) / routed if routed else math.nan


def engaged_experts(outputs: tuple) -> Tensor:
    """The experts each token engages [T], from a family router's outputs (scores [T, E], weights
    [T, k], indices [T, k]): a slot counts when it names a real expert with a nonzero weight, the
    pairs an experts implementation must run."""
    scores_TE, weights_TK, index_TK = outputs[:3]
    E = scores_TE.shape[-1]
    return ((index_TK >= 0) & (index_TK < E) & (weights_TK != 0)).sum(dim=1)


@contextlib.contextmanager
def experts_per_token(model: nn.Module) -> Iterator[ExpertCounts]:
    """Count the experts each token engages in every MoE block while the ``with`` body runs
    (forward hooks on the routers; an unmodified model counts its own top-k: ``engaged_experts``)."""
    routers = _routers_of(model)
    counts = ExpertCounts()

    def hook(_router: nn.Module, _inputs, outputs) -> None:
        counts.add(engaged_experts(outputs), outputs[0].shape[-1])

    handles = [router.register_forward_hook(hook) for router in routers]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _unsupported(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"{type(model).__name__} (model_type {model_type!r})"
    if model_type in SUPPORTED_FAMILIES:
        return (f"{what} has no sparse MoE block to route (its config builds dense layers only, e.g. "
                f"num_experts 0 or enable_moe_block False); xmoe.hf.adaptive needs a mixture-of-experts model")
    return (f"xmoe.hf.adaptive has no threshold rule for {what}; it supports {', '.join(SUPPORTED_FAMILIES)}. "
            f"Each MoE family scores and weighs its experts its own way (softmax or sigmoid, bias, groups, "
            f"normalisation), so each has its own rule, tested to reproduce the model exactly at its top-k "
            f"setting; see docs/adaptive.md")


def _check_max_experts(max_experts: int | None, router: nn.Module) -> None:
    if max_experts is None:
        return
    rule = family_of(router).rule
    limit = rule.candidates(router)  # reads the family router's own attributes, adapted or not
    if not (isinstance(max_experts, int) and not isinstance(max_experts, bool) and 1 <= max_experts <= limit):
        whose = (f"the model's own top-{limit} ({family_of(router).name} weighs only the experts it picks)"
                 if rule.own_top_k_only else f"the model's {limit} experts")
        raise UsageError(f"max_experts must be an integer from 1 to {whose}, or None for no cap; got {max_experts!r}")


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise UsageError(
            f"threshold must be a number > 0 (the normalised router mass each token's experts must reach; "
            f">= 1 keeps max_experts), got {threshold!r}"
        )
