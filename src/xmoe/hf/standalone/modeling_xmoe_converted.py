"""XMoEConvertedForCausalLM, self-contained (torch and transformers only): a Hugging Face GPT-2 or
LLaMA-style causal LM whose FFNs ``xmoe convert`` split into experts behind a fitted threshold
router, for folders written by ``xmoe export-hf`` and loaded with ``trust_remote_code=True``.

The model is the original architecture (built from ``config.base``) with a ``ConvertedMLP`` (an
XMoE layer, xmoe_layer.py, plus the FFN's output bias, added once) in place of each converted
FFN. Everything else, generation and the KV cache included, is the original model's own code;
the dial is ``config.moe_threshold``, read at every call. The original MLPs are called without
the attention mask, so pad tokens are routed like any other (their outputs are never read).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_xmoe import XMoEConvertedConfig
from .xmoe_layer import MoELayer


class ConvertedMLP(nn.Module):
    """Stands in for a Hugging Face MLP: ``moe(x) + bias`` (the FFN's output bias, added once)."""

    def __init__(self, config: XMoEConvertedConfig) -> None:
        super().__init__()
        self.moe = MoELayer(config)
        self.bias = nn.Parameter(torch.zeros(config.moe["model_dim"])) if config.moe_output_bias else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        y, _ = self.moe(hidden_states)
        return y if self.bias is None else y + self.bias


class XMoEConvertedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = XMoEConvertedConfig
    base_model_prefix = "model"

    def __init__(self, config: XMoEConvertedConfig) -> None:
        super().__init__(config)
        self.model = AutoModelForCausalLM.from_config(config.base_config())
        for name in config.converted_modules:
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, ConvertedMLP(config))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the original model initialised its modules when built, and from_pretrained
        loads every weight."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def forward(self, *args, **kwargs):
        """The original model's forward (same arguments, same outputs)."""
        return self.model(*args, **kwargs)
