"""The threshold dial for pretrained MoE LLMs: ``adaptive(model, threshold=t)`` turns a loaded
OLMoE, Qwen2-MoE, Qwen3-MoE or Mixtral model's top-k routing into XMoE's threshold rule
(Yang et al. 2024, arXiv 2403.18926, Sec. 3.2) on that model's own router probabilities, for
inference, and runs its experts with the "xmoe" implementation (experts.py), which computes only
the kept pairs.

The rule, per token: ``p = softmax(router logits)`` over all E experts, in fp32 (as each family
already computes it); sort p descending; keep rank j when j = 1 or ``p(1) + ... + p(j-1) < t``
(the expert that makes the mass reach t is included), and at most ``max_experts`` of them.
``t <= p(1)`` keeps one expert; ``t >= 1`` keeps ``max_experts`` (all E without a cap).

Each family keeps its own weighting of the experts it keeps:

- OLMoE (``olmoe``), Qwen2-MoE (``qwen2_moe``), Qwen3-MoE (``qwen3_moe``): the softmax
  probabilities over all experts, renormalised over the kept set when the config's
  ``norm_topk_prob`` is True (OLMoE and Qwen2-MoE ship False: raw probabilities; Qwen3-MoE
  ships True), cast to the router's dtype. Qwen2-MoE's shared expert (and its sigmoid gate) runs
  for every token, untouched.
- Mixtral (``mixtral``): always renormalised over the kept set (equal to a softmax over the kept
  experts' logits), kept in fp32.

So ``adaptive(model, threshold=1.0, max_experts=k)`` with the model's own k keeps exactly its
top-k with its weights: its logits equal the unmodified model's up to fp32 rounding.

Not supported: routers that do not produce a probability distribution to threshold, such as
DeepSeek-V3's sigmoid scores with bias correction and group-limited selection (``deepseek_v3``)
or GPT-OSS's softmax over the top-k logits only (``gpt_oss``); ``adaptive`` refuses them by name.

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.moe.router import threshold_prefix

from .experts import EXPERTS_IMPLEMENTATION

# model_type -> how the kept experts are weighted (see the module docstring).
SUPPORTED_FAMILIES = {
    "olmoe": "softmax over all experts, renormalised over the kept set if config.norm_topk_prob",
    "qwen2_moe": "softmax over all experts, renormalised over the kept set if config.norm_topk_prob",
    "qwen3_moe": "softmax over all experts, renormalised over the kept set if config.norm_topk_prob",
    "mixtral": "softmax over the kept experts' logits (softmax over all, renormalised over the kept set)",
}


class ThresholdTopKRouter(nn.Module):
    """Stands in for a family's ``*TopKRouter`` (same weight, same outputs' meaning): returns
    ``(router_logits [T, E], weights [T, K], indices [T, K])`` where each token's unused slots hold
    index E and weight 0; K is the most experts any token of the call keeps."""

    def __init__(self, router: nn.Module, *, threshold: float, max_experts: int | None, renormalize: bool,
                 fp32_weights: bool) -> None:
        super().__init__()
        self.weight = router.weight  # the same Parameter: state_dict keys and memory are unchanged
        self.num_experts, self.hidden_dim = router.weight.shape
        self.top_k = router.top_k  # the model's own k, for reference
        self.threshold = threshold
        self.max_experts = max_experts
        self.renormalize = renormalize
        self.fp32_weights = fp32_weights
        super().train(False)

    def train(self, mode: bool = True) -> ThresholdTopKRouter:
        if mode:
            raise UsageError(
                "a model adapted by xmoe.hf.adaptive routes for inference only (its threshold rule has no "
                "gradient path or balancing loss); to train, load the model again with from_pretrained"
            )
        return super().train(False)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, threshold={self.threshold}, max_experts={self.max_experts}, own_top_k={self.top_k}"

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        cap = self.max_experts or self.num_experts
        # A stable sort, so that ties go to the lower expert index, as in the layer.
        sorted_TE, index_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
        sorted_TK, index_TK = sorted_TE[:, :cap], index_TE[:, :cap]
        kept_TK = threshold_prefix(sorted_TK, self.threshold)  # the layer's rule, exactly
        width = int(kept_TK.sum(dim=1).max()) if kept_TK.shape[0] else 1  # a host sync; kept is a prefix
        kept_TK, sorted_TK, index_TK = kept_TK[:, :width], sorted_TK[:, :width], index_TK[:, :width]
        weights_TK = sorted_TK.masked_fill(~kept_TK, 0.0)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if not self.fp32_weights:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return logits_TE, weights_TK, index_TK.masked_fill(~kept_TK, self.num_experts)


def adaptive(model: nn.Module, *, threshold: float, max_experts: int | None = None) -> nn.Module:
    """Route every MoE block of ``model`` (a transformers OLMoE, Qwen2-MoE, Qwen3-MoE or Mixtral
    causal LM) by the threshold rule at ``threshold``, keeping at most ``max_experts`` experts per
    token (None: up to all E), and compute its experts with the "xmoe" implementation. In place;
    returns ``model``, in eval mode (training it afterwards raises). Calling it again on an
    adapted model changes the threshold and the cap."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UsageError(
            f"xmoe.hf.adaptive supports {', '.join(SUPPORTED_FAMILIES)} (softmax routers); got "
            f"{type(model).__name__} (model_type {family!r}). Sigmoid routers with bias correction "
            f"(deepseek_v3) and top-k-only softmaxes (gpt_oss) have no probability mass to threshold"
        )
    _check_threshold(threshold)
    blocks = moe_blocks(model)
    if not blocks:
        raise UsageError(f"found no MoE block (a .gate router beside .experts) in {type(model).__name__}")
    num_experts = blocks[0].gate.num_experts
    if max_experts is not None and not (
        isinstance(max_experts, int) and not isinstance(max_experts, bool) and 1 <= max_experts <= num_experts
    ):
        raise UsageError(
            f"max_experts must be an integer from 1 to the model's {num_experts} experts (or None for no cap), "
            f"got {max_experts!r}"
        )
    model.eval()
    for block in blocks:
        if isinstance(block.gate, ThresholdTopKRouter):
            block.gate.threshold, block.gate.max_experts = threshold, max_experts
            continue
        renormalize = True if family == "mixtral" else bool(block.gate.norm_topk_prob)
        block.gate = ThresholdTopKRouter(block.gate, threshold=threshold, max_experts=max_experts,
                                         renormalize=renormalize, fp32_weights=family == "mixtral")
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return model


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks of a transformers MoE model: modules with a ``gate`` router (a
    ``*TopKRouter``, or one adaptive() put there) and ``experts`` holding 3-D expert weights."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "gate", None), nn.Module) and hasattr(getattr(m, "experts", None), "down_proj")
            and (isinstance(m.gate, ThresholdTopKRouter) or type(m.gate).__name__.endswith("TopKRouter"))]


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, ThresholdTopKRouter) for m in model.modules())


@dataclass
class ExpertCounts:
    """Experts per token over every routed token of every MoE block: ``histogram[n]`` tokens
    engaged n experts (summed over blocks)."""

    num_experts: int
    histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.histogram = self.histogram or [0] * (self.num_experts + 1)

    def add(self, counts_T: Tensor) -> None:
        for n, c in enumerate(torch.bincount(counts_T, minlength=self.num_experts + 1).tolist()):
            self.histogram[n] += c

    @property
    def mean(self) -> float:
        total = sum(self.histogram)
        return sum(n * c for n, c in enumerate(self.histogram)) / total if total else math.nan


@contextlib.contextmanager
def experts_per_token(model: nn.Module) -> Iterator[ExpertCounts]:
    """Count the experts each token engages in every MoE block while the ``with`` body runs
    (forward hooks on the routers; an unmodified model counts its own top-k)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise UsageError(f"found no MoE block (a .gate router beside .experts) in {type(model).__name__}")
    counts = ExpertCounts(blocks[0].gate.num_experts)

    def hook(router: nn.Module, _inputs, outputs) -> None:
        index_TK = outputs[2]
        counts.add(((index_TK >= 0) & (index_TK < router.num_experts)).sum(dim=1))

    handles = [b.gate.register_forward_hook(hook) for b in blocks]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise UsageError(
            f"threshold must be a number > 0 (the router probability mass each token's experts must reach; "
            f">= 1 keeps max_experts), got {threshold!r}"
        )
