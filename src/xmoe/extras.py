"""Optional dependencies: the pip extra that brings each, and the error that names it.

The core (``xmoe.moe``, the models, language-model training) needs torch, numpy (token caches
and batches), tokenizers (the byte-level BPE), safetensors (checkpoints), tqdm (the progress
bar) and jsonargparse (run configs from flags and config.json). Everything else comes with an extra (pyproject.toml) and is imported where it is used,
inside ``needs_extra``, so that a missing module fails there with the command that installs it:

    with needs_extra("mt", "BLEU and chrF++"):
        from sacrebleu.metrics import BLEU, CHRF
    # without sacrebleu: MissingExtra: sacrebleu is not installed (BLEU and chrF++): pip install 'xmoe[mt]'

This module imports nothing from xmoe, so every layer may use it.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Iterator

# extra -> the top-level modules it brings (its packages in pyproject.toml; a test holds them equal)
EXTRAS: dict[str, tuple[str, ...]] = {
    "mt": ("sentencepiece", "sacrebleu"),  # translation: the subword vocabulary, BLEU and chrF++
    "report": ("matplotlib",),  # the plots of `xmoe report`, `xmoe train` and the threshold sweeps
    "study": ("matplotlib",),  # the plots of `xmoe study`
    "hf": ("transformers",),  # xmoe.hf and Hugging Face conversion
    "lmeval": ("lm_eval",),  # `xmoe lm-eval`: lm-evaluation-harness tasks at several thresholds
}


class MissingExtra(ImportError):
    """An optional module is not installed; the message names the extra that brings it."""


@contextmanager
def needs_extra(extra: str, purpose: str) -> Iterator[None]:
    """Turn a missing module of ``extra`` into ``MissingExtra`` naming ``purpose`` and the pip
    command; any other import error (a broken install, a module of no extra) passes unchanged."""
    modules = EXTRAS[extra]
    try:
        yield
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in modules:
            raise
        raise MissingExtra(f"{missing} is not installed ({purpose}): pip install 'xmoe[{extra}]'") from err


def check_extra(extra: str, purpose: str) -> None:
    """Import every module of ``extra`` now, so that a long job fails before it starts rather
    than at its first evaluation or its end."""
    with needs_extra(extra, purpose):
        for module in EXTRAS[extra]:
            importlib.import_module(module)


__all__ = ["EXTRAS", "MissingExtra", "check_extra", "needs_extra"]
