"""xmoe.presets: named model configs, one module per model (gpt.py for xmoe.models.gpt,
seq2seq.py for xmoe.models.seq2seq), apart from the models as nanoGPT's config/ is. Imports
point one way: xmoe.models <- xmoe.presets <- training, study, cli. ``xmoe presets`` lists them.

    from xmoe.models import GPT
    from xmoe.presets import get_preset
    model = GPT(get_preset("debug-xmoe"))
"""

from .gpt import PRESETS, get_preset, list_presets
from .seq2seq import MT_PRESETS, get_mt_preset, list_mt_presets

__all__ = ["MT_PRESETS", "PRESETS", "get_mt_preset", "get_preset", "list_mt_presets", "list_presets"]
