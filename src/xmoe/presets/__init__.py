"""xmoe.presets: named model configs (``xmoe presets`` lists them), one module per model: gpt.py
for xmoe.models.gpt, seq2seq.py for xmoe.models.seq2seq. Imports point one way: xmoe.models <-
xmoe.presets <- training, study, cli.  ``GPT(get_preset("debug-xmoe"))`` builds a model.
"""

from .gpt import PRESETS, get_preset, list_presets
from .seq2seq import MT_PRESETS, get_mt_preset, list_mt_presets

__all__ = ["MT_PRESETS", "PRESETS", "get_mt_preset", "get_preset", "list_mt_presets", "list_presets"]
