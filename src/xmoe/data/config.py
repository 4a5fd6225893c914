"""Configuration of the language-model data: corpus, tokenizer size, split, cache folder.

Batch shape (batch size, sequence length) and the batch seed are not here: they belong to the
training run and are given to ``LMData.train_batches`` / ``LMData.val_batches``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xmoe.errors import UsageError

# 256 byte tokens of the byte-level alphabet + the <|endoftext|> separator.
MIN_VOCAB_SIZE = 257


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens.

    path: None for the default corpus (Python's own reference documentation and standard-library
        docstrings, no download); else a text file, a ``.jsonl`` file with a ``"text"`` field per
        line, or a folder searched recursively for ``.txt``/``.md``/``.rst``/``.jsonl`` files.
    vocab_size: size of the byte-level BPE vocabulary to train (at least 257). A small corpus
        may give fewer tokens; ``LMData.vocab_size`` is the real size.
    val_fraction: the last ``val_fraction`` of the corpus characters (cut at a line start) is the
        validation split; the tokenizer is trained on the rest.
    test_fraction: 0 (default) for no test split; else the last ``test_fraction`` of the corpus
        characters is a held-out test split, and validation is the ``val_fraction`` just before
        it. Choose settings on validation, report on test (``xmoe study sharpen`` does).
    cache_dir: where token arrays are cached; None for ``$XDG_CACHE_HOME/xmoe/tokens``
        (``~/.cache/xmoe/tokens``).
    """

    path: str | None = None
    vocab_size: int = 4096
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("path", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(
                    f"DataConfig.{name} must be a non-empty path string or None, got {value!r}"
                )
        if (
            not isinstance(self.vocab_size, int)
            or isinstance(self.vocab_size, bool)
            or self.vocab_size < MIN_VOCAB_SIZE
        ):
            raise UsageError(
                f"DataConfig.vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + "
                f"<|endoftext|>), got {self.vocab_size!r}"
            )
        f = self.val_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or math.isnan(f) or not 0 < f < 1:
            raise UsageError(
                f"DataConfig.val_fraction must be a number strictly between 0 and 1 (e.g. 0.05), "
                f"got {f!r}"
            )
        f = self.test_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or math.isnan(f) or not 0 <= f < 1 - self.val_fraction:
            raise UsageError(
                f"DataConfig.test_fraction must be a number in [0, 1 - val_fraction) (0: no test split; "
                f"e.g. 0.05), got {f!r} with val_fraction={self.val_fraction!r}"
            )
