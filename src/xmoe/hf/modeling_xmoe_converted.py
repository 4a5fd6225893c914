"""XMoEConvertedForCausalLM: a Hugging Face GPT-2 or LLaMA-style causal LM converted by
``xmoe convert`` (xmoe.conversion.hf: each FFN split into experts behind a fitted threshold
router), as a transformers model of its own, so the converted folder loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

The config holds the original model's config (``base``, its model_type included), where the
converted FFNs sit, their MoE config, and ``moe_threshold``; the model builds the original
architecture from ``base`` and puts a ``ConvertedMLP`` (an xmoe ``MoELayer`` plus the FFN's
output bias, added once) in place of each converted FFN. Everything else, generation and the
KV cache included, is the original model's own code.

This file is copied beside the weights by ``save_pretrained``, so it imports xmoe only by
absolute imports: a user of the folder needs xmoe installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from xmoe.conversion.hf import ConvertedMLP
from xmoe.moe import MoEConfig, MoELayer


class XMoEConvertedConfig(PretrainedConfig):
    model_type = "xmoe_converted"

    def __init__(self, base: dict | None = None, converted_modules: list[str] | None = None, moe: dict | None = None,
                 moe_output_bias: bool = False, moe_threshold: float | None = None, **kwargs) -> None:
        self.base = dict(base or {"model_type": "gpt2"})
        self.converted_modules = list(converted_modules or [])
        self.moe = dict(moe) if moe is not None else None
        self.moe_output_bias = moe_output_bias
        if moe_threshold is None and self.moe is not None:
            moe_threshold = self.moe.get("threshold")
        self.moe_threshold = moe_threshold
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        """The original model's config."""
        fields = dict(self.base)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        # Generation sizes its KV cache from the text config: the original model's.
        return self.base_config().get_text_config(*args, **kwargs)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(**{**self.moe, "threshold": self.moe_threshold})


class XMoEConvertedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = XMoEConvertedConfig
    base_model_prefix = "model"

    def __init__(self, config: XMoEConvertedConfig) -> None:
        super().__init__(config)
        self.model = AutoModelForCausalLM.from_config(config.base_config())
        moe = config.moe_config()
        for name in config.converted_modules:
            bias_D = torch.zeros(moe.model_dim) if config.moe_output_bias else None
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, ConvertedMLP(MoELayer(moe), bias_D))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the original model initialised its modules when built, and from_pretrained
        loads every weight."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def moe_threshold(self) -> float | None:
        """The threshold the MoE layers route with now."""
        thresholds = {m.threshold for m in self.modules() if isinstance(m, MoELayer)}
        return thresholds.pop() if len(thresholds) == 1 else self.config.moe_threshold

    def save_pretrained(self, *args, **kwargs):
        # The live t goes into config.json: xmoe.moe.set_threshold(model, t) changes the layers only.
        self.config.moe_threshold = self.moe_threshold
        return super().save_pretrained(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The original model's forward (same arguments, same outputs)."""
        return self.model(*args, **kwargs)
