"""The MoE families ``adaptive`` knows: each one's router class in transformers, and the threshold
rule written for it (docs/adaptive.md explains each rule).

A family is recognised by its router's class, not by ``config.model_type``, so a family's
router is found wherever it sits (Qwen3.5-MoE and Gemma-4 checkpoints are multimodal models
around the text model). The class is named by its full path under ``transformers.models`` and
matched against the module's class hierarchy, so nothing is imported and a remote-code class
of the same name (``trust_remote_code``) is not mistaken for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import ThresholdRouter
from .sigmoid import GroupLimitedSigmoidThreshold
from .softmax import Gemma4Threshold, MixtralThreshold, RenormalizedSoftmaxThreshold, SoftmaxThreshold
from .topk_softmax import TopKSoftmaxThreshold


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type of its checkpoints
    router: str  # its router class, "package.module.Class" under transformers.models
    rule: type[ThresholdRouter]
    mass: str  # what the threshold accumulates
    weights: str  # how the kept experts are weighed


_SOFTMAX = "softmax over all experts"
_RENORMALISED_IF = "the mass, renormalised over the kept set if config.norm_topk_prob"
_OWN_K = "over the family's own k"

FAMILIES = (
    Family("OLMoE", ("olmoe",), "olmoe.modeling_olmoe.OlmoeTopKRouter", SoftmaxThreshold, _SOFTMAX, _RENORMALISED_IF),
    Family("FlexOlmo", ("flex_olmo",), "flex_olmo.modeling_flex_olmo.FlexOlmoTopKRouter", SoftmaxThreshold,
           _SOFTMAX, _RENORMALISED_IF),
    Family("Qwen2-MoE", ("qwen2_moe",), "qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", SoftmaxThreshold,
           _SOFTMAX, _RENORMALISED_IF + "; the shared expert runs for every token"),
    Family("Qwen3-MoE", ("qwen3_moe",), "qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", SoftmaxThreshold,
           _SOFTMAX, _RENORMALISED_IF),
    Family("Qwen3-Next", ("qwen3_next",), "qwen3_next.modeling_qwen3_next.Qwen3NextTopKRouter", SoftmaxThreshold,
           _SOFTMAX, _RENORMALISED_IF + "; the shared expert runs for every token"),
    Family("Qwen3.5-MoE", ("qwen3_5_moe", "qwen3_5_moe_text"), "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeTopKRouter",
           RenormalizedSoftmaxThreshold, _SOFTMAX,
           "the mass renormalised over the kept set; the shared expert runs for every token"),
    Family("Mixtral", ("mixtral",), "mixtral.modeling_mixtral.MixtralTopKRouter", MixtralThreshold, _SOFTMAX,
           "the mass renormalised over the kept set, in fp32"),
    Family("Gemma-4", ("gemma4", "gemma4_text"), "gemma4.modeling_gemma4.Gemma4TextRouter", Gemma4Threshold, _SOFTMAX,
           "the mass renormalised over the kept set, times the learned per-expert scale"),
    Family("gpt-oss", ("gpt_oss",), "gpt_oss.modeling_gpt_oss.GptOssTopKRouter", TopKSoftmaxThreshold,
           "softmax over the top-k logits (with the router's bias)",
           "softmax over the kept experts' logits (the mass renormalised over the kept set)"),
    *(Family(name, (model_type,), router, GroupLimitedSigmoidThreshold,
             f"sigmoid scores of the k experts the family picks (bias, groups), normalised {_OWN_K}",
             "sigmoid scores renormalised over the kept set if config.norm_topk_prob, times routed_scaling_factor")
      for name, model_type, router in (
          ("DeepSeek-V3", "deepseek_v3", "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter"),
          ("GLM-4.5", "glm4_moe", "glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter"),
          ("GLM-4.7-Flash", "glm4_moe_lite", "glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteTopkRouter"))),
)

_BY_ROUTER = {f"transformers.models.{family.router}": family for family in FAMILIES}

# model_type -> how the kept experts are weighed
SUPPORTED_FAMILIES = {model_type: family.weights for family in FAMILIES for model_type in family.model_types}


def family_of(module: nn.Module) -> Family | None:
    """The family whose router ``module`` is (adapted or not), or None."""
    for cls in type(module).__mro__:
        family = _BY_ROUTER.get(f"{cls.__module__}.{cls.__qualname__}")
        if family is not None:
            return family
    return None
