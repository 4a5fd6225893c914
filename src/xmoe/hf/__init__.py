"""xmoe.hf: xmoe models as Hugging Face transformers models, and the threshold dial for pretrained
MoE LLMs (needs ``pip install 'xmoe[hf]'``).

    import xmoe.hf                      # registers "xmoe" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported")   # written by `xmoe export-hf`
    xmoe.moe.set_threshold(model, 0.7)  # the compute dial

    olmoe = AutoModelForCausalLM.from_pretrained("olmoe-folder")
    xmoe.hf.adaptive(olmoe, threshold=0.6)    # top-8 becomes the threshold rule (inference)

Importing this package registers, in transformers' own registries: the "xmoe" model type
(AutoConfig, AutoModelForCausalLM, and ``register_for_auto_class``, so ``save_pretrained``
writes ``auto_map`` and the modeling code for ``trust_remote_code`` loading without this import),
and the "xmoe" experts implementation (``ExpertsInterface``) that the adapted models run.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .adaptive import SUPPORTED_FAMILIES, adaptive, experts_per_token, is_adapted
from .configuration_xmoe import XMoEConfig
from .experts import EXPERTS_IMPLEMENTATION, register_experts
from .export import export_hf, export_model, is_xmoe_folder
from .modeling_xmoe import XMoECausalLMOutput, XMoEForCausalLM

AutoConfig.register(XMoEConfig.model_type, XMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(XMoEConfig, XMoEForCausalLM, exist_ok=True)
XMoEConfig.register_for_auto_class()
XMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
register_experts()

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "SUPPORTED_FAMILIES",
    "XMoECausalLMOutput",
    "XMoEConfig",
    "XMoEForCausalLM",
    "adaptive",
    "experts_per_token",
    "export_hf",
    "export_model",
    "is_adapted",
    "is_xmoe_folder",
]
