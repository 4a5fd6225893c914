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
    """A family: what its rule's mass is and how it weighs the kept experts are in its rule's
    module docstring and in docs/adaptive.md."""

    name: str
    model_types: tuple[str, ...]  # config.model_type of its checkpoints
    router: str  # its router class, "package.module.Class" under transformers.models
    rule: type[ThresholdRouter]


FAMILIES = (
    Family("OLMoE", ("olmoe",), "olmoe.modeling_olmoe.OlmoeTopKRouter", SoftmaxThreshold),
    Family("FlexOlmo", ("flex_olmo",), "flex_olmo.modeling_flex_olmo.FlexOlmoTopKRouter", SoftmaxThreshold),
    Family("Qwen2-MoE", ("qwen2_moe",), "qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", SoftmaxThreshold),
    Family("Qwen3-MoE", ("qwen3_moe",), "qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", SoftmaxThreshold),
    Family("Qwen3-Next", ("qwen3_next",), "qwen3_next.modeling_qwen3_next.Qwen3NextTopKRouter", SoftmaxThreshold),
    Family("Qwen3.5-MoE", ("qwen3_5_moe", "qwen3_5_moe_text"), "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeTopKRouter",
           RenormalizedSoftmaxThreshold),
    Family("Mixtral", ("mixtral",), "mixtral.modeling_mixtral.MixtralTopKRouter", MixtralThreshold),
    Family("Gemma-4", ("gemma4", "gemma4_text"), "gemma4.modeling_gemma4.Gemma4TextRouter", Gemma4Threshold),
    Family("gpt-oss", ("gpt_oss",), "gpt_oss.modeling_gpt_oss.GptOssTopKRouter", TopKSoftmaxThreshold),
    Family("DeepSeek-V3", ("deepseek_v3",), "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
           GroupLimitedSigmoidThreshold),
    Family("GLM-4.5", ("glm4_moe",), "glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter", GroupLimitedSigmoidThreshold),
    Family("GLM-4.7-Flash", ("glm4_moe_lite",), "glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteTopkRouter",
           GroupLimitedSigmoidThreshold),
)

_BY_ROUTER = {f"transformers.models.{family.router}": family for family in FAMILIES}

SUPPORTED_FAMILIES = tuple(model_type for family in FAMILIES for model_type in family.model_types)


def family_of(module: nn.Module) -> Family | None:
    """The family whose router ``module`` is (adapted or not), or None."""
    for cls in type(module).__mro__:
        family = _BY_ROUTER.get(f"{cls.__module__}.{cls.__qualname__}")
        if family is not None:
            return family
    return None
