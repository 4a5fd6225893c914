"""xmoe.hf: xmoe models as Hugging Face transformers models, and the threshold dial for pretrained
MoE LLMs (needs ``pip install 'xmoe[hf]'``).

    import xmoe.hf                      # registers "xmoe" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported")   # written by `xmoe export-hf`
    model.config.moe_threshold = 0.7    # the compute dial (xmoe.moe.set_threshold(model, 0.7) too)

    olmoe = AutoModelForCausalLM.from_pretrained("olmoe-folder")
    xmoe.hf.adaptive(olmoe, threshold=0.6)    # top-8 becomes the threshold rule (inference)

Importing this package registers, in transformers' own registries: the "xmoe" model type (and
"xmoe_converted", a Hugging Face model converted by ``xmoe convert``) with AutoConfig and
AutoModelForCausalLM, and the "xmoe" experts implementation (``ExpertsInterface``) that the
adapted models run. Their ``save_pretrained`` writes ``auto_map`` and self-contained modeling
code (xmoe.hf.standalone), so a saved folder loads with ``trust_remote_code=True`` and no xmoe.
"""

from xmoe.extras import MissingExtra

try:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.moe import ExpertsInterface
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise MissingExtra("xmoe.hf needs transformers >= 5.17: pip install 'xmoe[hf]'") from err

from .adaptive import SUPPORTED_FAMILIES, adaptive, experts_per_token, is_adapted
from .configuration_xmoe import XMoEConfig, XMoEConvertedConfig
from .experts import EXPERTS_IMPLEMENTATION, xmoe_experts_forward
from .export import export_hf, export_model, is_xmoe_folder
from .modeling_xmoe import XMoECausalLMOutput, XMoEForCausalLM
from .modeling_xmoe_converted import XMoEConvertedForCausalLM

for _config, _model in ((XMoEConfig, XMoEForCausalLM), (XMoEConvertedConfig, XMoEConvertedForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)
ExpertsInterface.register(EXPERTS_IMPLEMENTATION, xmoe_experts_forward)  # experts_implementation="xmoe"

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "SUPPORTED_FAMILIES",
    "XMoECausalLMOutput",
    "XMoEConfig",
    "XMoEConvertedConfig",
    "XMoEConvertedForCausalLM",
    "XMoEForCausalLM",
    "adaptive",
    "experts_per_token",
    "export_hf",
    "export_model",
    "is_adapted",
    "is_xmoe_folder",
]
