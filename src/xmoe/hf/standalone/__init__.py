"""The modeling code ``xmoe export-hf`` writes into a folder: self-contained, it imports only torch
and transformers, so the folder loads with ``trust_remote_code=True`` where xmoe is not installed.

    configuration_xmoe.py        XMoEConfig, XMoEConvertedConfig
    xmoe_layer.py                the XMoE layer (threshold router, experts)
    modeling_xmoe.py             XMoEForCausalLM: an XMoE GPT
    modeling_xmoe_converted.py   XMoEConvertedForCausalLM: a converted Hugging Face model

Nothing in this folder may import xmoe (a test checks it); xmoe's own models (xmoe.hf) compute
the same with xmoe's layers and are held equal to these by tests.
"""

from pathlib import Path

FILES = ("configuration_xmoe.py", "xmoe_layer.py", "modeling_xmoe.py", "modeling_xmoe_converted.py")
FOLDER = Path(__file__).parent
