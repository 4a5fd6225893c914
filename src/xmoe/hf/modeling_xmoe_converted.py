"""XMoEConvertedForCausalLM: a Hugging Face GPT-2 or LLaMA-style causal LM converted by
``xmoe convert`` (xmoe.conversion.hf: each FFN split into experts behind a fitted threshold
router), as a transformers model of its own, with xmoe's layers.

The config holds the original model's config (``base``, its model_type included), where the
converted FFNs sit, their MoE config, and the dial ``moe_threshold``; the model builds the
original architecture from ``base`` and puts a ``ConvertedMLP`` (an xmoe ``MoELayer`` plus the
FFN's output bias, added once) in place of each converted FFN. Everything else, generation and
the KV cache included, is the original model's own code. ``save_pretrained`` writes the
portable modeling code (xmoe.hf.standalone.modeling_xmoe_converted), so a saved folder loads
with ``trust_remote_code=True`` where xmoe is not installed.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from xmoe.conversion.hf import install_converted

from .configuration_xmoe import XMoEConvertedConfig, moe_config
from .modeling_xmoe import DialMixin
from .standalone.modeling_xmoe_converted import XMoEConvertedForCausalLM as PortableModel


class XMoEConvertedForCausalLM(DialMixin, PreTrainedModel, GenerationMixin):
    config_class = XMoEConvertedConfig
    base_model_prefix = "model"
    _init_weights = PortableModel._init_weights
    get_input_embeddings = PortableModel.get_input_embeddings
    set_input_embeddings = PortableModel.set_input_embeddings
    get_output_embeddings = PortableModel.get_output_embeddings
    set_output_embeddings = PortableModel.set_output_embeddings

    def __init__(self, config: XMoEConvertedConfig) -> None:
        super().__init__(config)
        self.model = AutoModelForCausalLM.from_config(config.base_config())
        install_converted(self.model, config.converted_modules, moe_config(config), bias=config.moe_output_bias)
        self._applied_threshold = config.moe_threshold
        self.post_init()

    def forward(self, *args, **kwargs):
        """The original model's forward (same arguments, same outputs), at the config's dial."""
        self.apply_dial()
        return self.model(*args, **kwargs)
