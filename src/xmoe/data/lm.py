"""Language-model data for a run: corpus -> split -> tokenizer (in the run dir) -> cached tokens.

    data = prepare_lm_data(DataConfig(path=None, vocab_size=4096), run_dir)
    train = data.train_batches(batch_size=16, seq_len=256, seed=0)
    x_BL, y_BL = train.batch(step)                    # the same batch after a resume
    for x_BL, y_BL in data.val_batches(batch_size=16, seq_len=256, max_batches=20): ...

A run directory that already holds ``tokenizer.json`` keeps it (resume, evaluation); a fresh one
gets a tokenizer trained on the train split. Token arrays are cached under
``DataConfig.cache_dir``, keyed by the corpus content, the split and the tokenizer, so a second
run with the same inputs tokenizes nothing. New text for evaluation goes through the run's
tokenizer with ``load_eval_tokens``. Batch shape (batch size, sequence length) and the batch
seed are not in DataConfig: they belong to the training run and are given to
``LMData.train_batches`` / ``LMData.val_batches``.

The token cache: an entry is a folder ``<cache_dir>/<key>/`` holding one ``<name>.npy`` per
array (memory-mapped on load), where the key hashes everything the tokens depend on. An entry is
built in a hidden temporary folder beside it and published with one ``os.replace``, so an
interrupted run leaves no entry or a whole one (and at worst a hidden ``.<key>.*.tmp`` folder,
safe to delete); two runs racing on one key both build, the first rename wins and the other
uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmoe.errors import UsageError

from .batches import TrainBatches, ValBatches
from .corpus import corpus_fingerprint, load_corpus, split_documents
from .files import temporary_name
from .tokenizer import TOKENIZER_FILE, BPETokenizer


# 256 byte tokens of the byte-level alphabet + the <|endoftext|> separator.
MIN_VOCAB_SIZE = 257
# Bump when the layout or the meaning of cached tokens changes, so old entries are not reused.
CACHE_FORMAT = 1


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


@dataclass(frozen=True, kw_only=True, eq=False)
class LMData:
    """The tokenizer and the train/validation(/test) token streams (read-only memory maps) of a run."""

    tokenizer: BPETokenizer
    train_tokens: np.ndarray = field(repr=False)
    val_tokens: np.ndarray = field(repr=False)
    test_tokens: np.ndarray | None = field(repr=False, default=None)  # None: DataConfig.test_fraction = 0
    source: str
    fingerprint: str
    cache_entry: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_batches(self, *, batch_size: int, seq_len: int, seed: int = 0) -> TrainBatches:
        """Training batches; ``.batch(i)`` is a pure function of ``(seed, i)``."""
        return TrainBatches(
            tokens=self.train_tokens,
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            name=f"the train split of {self.source}",
        )

    def val_batches(
        self, *, batch_size: int, seq_len: int, max_batches: int | None = None, split: str = "val"
    ) -> ValBatches:
        """Evaluation batches of the validation (or ``split="test"``) split: non-overlapping
        windows in order, the same every time."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        tokens = self.val_tokens if split == "val" else self.test_tokens
        if tokens is None:
            raise UsageError(f"{self.source} has no test split in this run; set data.test_fraction (e.g. 0.05)")
        return ValBatches(
            tokens=tokens,
            batch_size=batch_size,
            seq_len=seq_len,
            max_batches=max_batches,
            name=f"the {'validation' if split == 'val' else 'test'} split of {self.source}",
        )


def prepare_lm_data(cfg: DataConfig, run_dir: str | os.PathLike[str]) -> LMData:
    """Load, split and tokenize the corpus of ``cfg``; train or reuse ``run_dir/tokenizer.json``."""
    source = describe_source(cfg.path)
    documents = load_corpus(cfg.path)
    test_docs = None
    if cfg.test_fraction > 0:
        documents_left, test_docs = split_documents(documents, cfg.test_fraction, source=source)
        val_share = cfg.val_fraction / (1 - cfg.test_fraction)  # of what is left, so of the corpus: val_fraction
        train_docs, val_docs = split_documents(documents_left, val_share, source=source)
    else:
        train_docs, val_docs = split_documents(documents, cfg.val_fraction, source=source)

    tokenizer_path = Path(run_dir) / TOKENIZER_FILE
    if tokenizer_path.is_file():
        tokenizer = BPETokenizer.load(tokenizer_path)
        if tokenizer.vocab_size > cfg.vocab_size:
            warnings.warn(
                f"{str(tokenizer_path)!r} has {tokenizer.vocab_size} tokens, more than "
                f"DataConfig.vocab_size={cfg.vocab_size}; using the saved tokenizer (delete it "
                f"or use a new run directory to train one of the configured size)",
                stacklevel=2,
            )
    else:
        tokenizer = BPETokenizer.train(train_docs, vocab_size=cfg.vocab_size)
        tokenizer.save(tokenizer_path)

    fingerprint = corpus_fingerprint(documents)
    cache_dir = _cache_dir(cfg.cache_dir)
    splits = {"train": train_docs, "val": val_docs, **({"test": test_docs} if test_docs is not None else {})}
    test = {"test_fraction": cfg.test_fraction} if test_docs is not None else {}  # older keys unchanged
    key = cache_key(corpus=fingerprint, val_fraction=cfg.val_fraction, tokenizer=_tokenizer_hash(tokenizer), **test)
    arrays = cached_arrays(
        cache_dir, key, tuple(splits), lambda: {name: tokenizer.encode_documents(docs) for name, docs in splits.items()}
    )
    return LMData(
        tokenizer=tokenizer,
        train_tokens=arrays["train"],
        val_tokens=arrays["val"],
        test_tokens=arrays.get("test"),
        source=source,
        fingerprint=fingerprint,
        cache_entry=cache_dir / key,
    )


def load_tokenizer(run_dir: str | os.PathLike[str]) -> BPETokenizer:
    """The tokenizer saved in a run directory by ``prepare_lm_data``."""
    return BPETokenizer.load(Path(run_dir) / TOKENIZER_FILE)


def load_eval_tokens(
    path: str, run_dir: str | os.PathLike[str], *, cache_dir: str | None = None
) -> np.ndarray:
    """Every document at ``path`` tokenized with the run's tokenizer (no split), cached.

    Evaluate with ``ValBatches(tokens=..., batch_size=..., seq_len=..., name=repr(path))``.
    """
    tokenizer = load_tokenizer(run_dir)
    documents = load_corpus(path)
    fingerprint = corpus_fingerprint(documents)
    key = cache_key(corpus=fingerprint, val_fraction=None, tokenizer=_tokenizer_hash(tokenizer))
    arrays = cached_arrays(
        _cache_dir(cache_dir), key, ("all",), lambda: {"all": tokenizer.encode_documents(documents)}
    )
    return arrays["all"]


def describe_source(path: str | None) -> str:
    """How error messages name a corpus: its path, or the default corpus and Python version."""
    if path is None:
        return f"the default corpus (Python {sys.version_info.major}.{sys.version_info.minor} docs)"
    return repr(path)


def _cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xmoe/tokens``, or ``~/.cache/xmoe/tokens`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xmoe" / "tokens"


def cache_key(**inputs: str | float | int | None) -> str:
    """A short hex key for the given inputs (order of the keywords does not matter)."""
    payload = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def cached_arrays(
    cache_dir: Path,
    key: str,
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of entry ``key``, read-only memory maps; ``build()`` them on a miss."""
    entry = cache_dir / key
    if not entry.is_dir():
        arrays = build()
        assert set(arrays) == set(names), f"build returned {sorted(arrays)}, expected {names}"
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / temporary_name(key)
        tmp.mkdir()
        try:
            for name, array in arrays.items():
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, np.ascontiguousarray(array))
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.replace(tmp, entry)
            except OSError:
                if not entry.is_dir():  # not a lost race: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in names}


def _tokenizer_hash(tokenizer: BPETokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
