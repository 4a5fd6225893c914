"""Parallel text for translation: line-aligned files, a joint sentencepiece vocabulary saved with
the run, over-long pair filtering, and length-bucketed batches by token count.

    cfg = TranslationDataConfig(src="train.en", tgt="train.de", valid_src="val.en", valid_tgt="val.de")
    data = prepare_translation_data(cfg, run_dir)        # trains RUN/spm.model
    batches = data.train_batches(max_tokens=4096, seed=0)
    src_BS, tgt_in_BL, tgt_out_BL = batches.batch(step) # a pure function of (seed, step)

Sequences: source = pieces + EOS; decoder input = BOS + pieces; decoder target = pieces + EOS;
all right-padded with PAD. Batches follow fairseq's ``--max-tokens`` (Ott et al., 2019): pairs
sorted by length are cut into batches whose padded size ``rows x longest side`` stays within
``max_tokens``. The list of batches is fixed by the seed; epoch e visits it in the order of a
permutation seeded by (seed, e), so batch i depends on (seed, i) only: an exact resume.

Imports nothing else from xmoe but ``xmoe.extras`` (sentencepiece is ``pip install 'xmoe[mt]'``).
Shapes: B sentences, S source length, L target length.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xmoe.errors import UsageError
from xmoe.extras import needs_extra

from .files import check_regular_file, decode_lines, temporary_name

SPM_FILE = "spm.model"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass(frozen=True, kw_only=True)
class TranslationDataConfig:
    """Where the sentence pairs come from and how they become batches.

    src, tgt: training files, one sentence per line, equal line counts.
    valid_src, valid_tgt: validation files (both or neither); without them the last
        ``val_lines`` training pairs are held out.
    vocab_size: joint sentencepiece vocabulary (source and target); a small corpus may give fewer.
    max_len: pairs whose source (+EOS) or target (+BOS) exceeds this many tokens are dropped from
        training (the model's position limit must be at least this).
    max_tokens: padded tokens per batch (rows x longest side), at least max_len.
    """

    src: str | None = None
    tgt: str | None = None
    valid_src: str | None = None
    valid_tgt: str | None = None
    val_lines: int = 200
    vocab_size: int = 8000
    max_len: int = 128
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("src", "tgt", "valid_src", "valid_tgt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(f"data.{name} must be a file path or None, got {value!r}")
        if (self.valid_src is None) != (self.valid_tgt is None):
            raise UsageError("data.valid_src and data.valid_tgt go together: give both files or neither")
        for name, minimum in (("val_lines", 1), ("vocab_size", 16), ("max_len", 2), ("max_tokens", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise UsageError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
        if self.max_tokens < self.max_len:
            raise UsageError(
                f"data.max_tokens={self.max_tokens} < data.max_len={self.max_len}: the longest kept pair "
                f"would not fit in a batch; raise max_tokens or lower max_len"
            )


def read_sentence_pairs(src: str | os.PathLike, tgt: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The lines of two aligned files (trailing whitespace stripped); equal counts are checked."""
    src_lines, tgt_lines = read_lines(src), read_lines(tgt)
    if len(src_lines) != len(tgt_lines):
        raise UsageError(
            f"parallel files differ in length: {src} has {len(src_lines)} lines, {tgt} has "
            f"{len(tgt_lines)}; they must be line-aligned (one sentence pair per line)"
        )
    if not src_lines:
        raise UsageError(f"parallel files {src} and {tgt} are empty")
    return src_lines, tgt_lines


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file, trailing whitespace stripped; errors name the file and line."""
    path = Path(path)
    check_regular_file(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a text file with one sentence per line")
    with open(path, "rb") as f:
        return [line.rstrip() for line in decode_lines(f, str(path))]


class SubwordVocab:
    """A sentencepiece model with PAD 0, UNK 1, BOS 2, EOS 3 (Kudo & Richardson, 2018)."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, path: str | os.PathLike) -> None:
        with needs_extra("mt", "the translation vocabulary"):
            import sentencepiece as spm

        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        assert (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()) == (PAD_ID, BOS_ID, EOS_ID)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def train_subword_vocab(texts: Sequence[str], folder: str | os.PathLike, vocab_size: int) -> SubwordVocab:
    """Train a joint unigram sentencepiece model on ``texts``; saved atomically as FOLDER/spm.model.

    ``hard_vocab_limit=False``: a corpus too small for ``vocab_size`` gets a smaller vocabulary
    instead of an error."""
    with needs_extra("mt", "the translation vocabulary"):
        import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / temporary_name("spm")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([t for t in texts if t]), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, num_threads=1, minloglevel=2,
        )
        os.replace(f"{prefix}.model", folder / SPM_FILE)
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    return SubwordVocab(folder / SPM_FILE)


def load_subword_vocab(folder: str | os.PathLike) -> SubwordVocab:
    path = Path(folder) / SPM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no sentencepiece model at {path}; train-mt writes it into the run folder")
    return SubwordVocab(path)


@dataclass(frozen=True, kw_only=True, eq=False)
class Pairs:
    """Encoded sentence pairs (token ids without special tokens) and their original line numbers."""

    src: list[np.ndarray] = field(repr=False)
    tgt: list[np.ndarray] = field(repr=False)
    lines: np.ndarray = field(repr=False)  # original line index of each kept pair
    num_filtered: int = 0  # pairs dropped as over-long

    def __len__(self) -> int:
        return len(self.src)


def encode_pairs(vocab: SubwordVocab, src_lines: Sequence[str], tgt_lines: Sequence[str], *,
                 max_len: int | None) -> Pairs:
    """Encode aligned lines; with ``max_len``, drop pairs whose source + EOS or BOS + target
    exceeds it."""
    src = vocab.encode_batch(src_lines)
    tgt = vocab.encode_batch(tgt_lines)
    keep = [i for i in range(len(src)) if max_len is None or max(len(src[i]), len(tgt[i])) + 1 <= max_len]
    return Pairs(src=[np.asarray(src[i], dtype=np.int64) for i in keep],
                 tgt=[np.asarray(tgt[i], dtype=np.int64) for i in keep],
                 lines=np.asarray(keep, dtype=np.int64), num_filtered=len(src) - len(keep))


def bucket(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, *, seed: int | None) -> list[np.ndarray]:
    """Indices of each batch: sorted by (source, target) length, ties broken by a permutation
    seeded by ``seed`` (None: original order); a batch grows while rows x longest side (with
    special tokens) stays within ``max_tokens``."""
    n = len(src_lens)
    tiebreak = np.arange(n) if seed is None else np.random.Generator(np.random.PCG64(seed)).permutation(n)
    order = np.lexsort((tiebreak, tgt_lens, src_lens))
    batches, start, longest = [], 0, 0
    for pos, i in enumerate(order):
        size = max(src_lens[i], tgt_lens[i]) + 1
        if pos > start and max(longest, size) * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, longest = pos, 0
        longest = max(longest, size)
    if n:
        batches.append(order[start:])
    return batches


def collate(pairs: Pairs, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src_BS, tgt_in_BL, tgt_out_BL), int64, right-padded."""
    src = [np.append(pairs.src[i], EOS_ID) for i in index]
    tgt_in = [np.insert(pairs.tgt[i], 0, BOS_ID) for i in index]
    tgt_out = [np.append(pairs.tgt[i], EOS_ID) for i in index]
    return pad(src), pad(tgt_in), pad(tgt_out)


def pad(rows: Sequence[np.ndarray]) -> torch.Tensor:
    out = np.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, :len(row)] = row
    return torch.from_numpy(out)


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenBatches:
    """Training batches; ``batch(i)`` depends only on ``(seed, i)`` and the pairs."""

    pairs: Pairs = field(repr=False)
    max_tokens: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not len(self.pairs):
            raise UsageError("no training pairs are left after filtering; raise data.max_len or check the files")
        src_lens = np.array([len(s) for s in self.pairs.src])
        tgt_lens = np.array([len(t) for t in self.pairs.tgt])
        object.__setattr__(self, "batches", bucket(src_lens, tgt_lens, self.max_tokens, seed=self.seed))

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
            raise UsageError(f"batch index must be a non-negative integer, got {i!r}")
        epoch, j = divmod(int(i), len(self.batches))
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch]))).permutation(
            len(self.batches))
        return collate(self.pairs, self.batches[order[j]])


def eval_batches(pairs: Pairs, max_tokens: int) -> Iterator[tuple[np.ndarray, tuple[torch.Tensor, ...]]]:
    """Validation batches in a fixed order: (positions in ``pairs``, collated tensors)."""
    src_lens = np.array([len(s) for s in pairs.src])
    tgt_lens = np.array([len(t) for t in pairs.tgt])
    for index in bucket(src_lens, tgt_lens, max_tokens, seed=None):
        yield index, collate(pairs, index)


def source_batches(vocab: SubwordVocab, lines: Sequence[str], *, max_tokens: int, max_len: int
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Sentences to translate, bucketed by length: (line indices, src_BS). A source longer
    than ``max_len`` (with EOS) is cropped, with a warning."""
    ids = vocab.encode_batch(lines)
    cropped = sum(len(s) + 1 > max_len for s in ids)
    if cropped:
        warnings.warn(f"{cropped} source sentence(s) longer than {max_len} tokens were cropped", stacklevel=2)
    src = [np.asarray(s[:max_len - 1], dtype=np.int64) for s in ids]
    lens = np.array([len(s) for s in src])
    pairs = Pairs(src=src, tgt=[np.zeros(0, dtype=np.int64)] * len(src), lines=np.arange(len(src)))
    for index in bucket(lens, np.zeros_like(lens), max_tokens, seed=None):
        yield index, collate(pairs, index)[0]


@dataclass(frozen=True, kw_only=True, eq=False)
class TranslationData:
    vocab: SubwordVocab
    train: Pairs
    valid: Pairs  # over-long pairs dropped too (for the validation loss; BLEU uses every line)
    valid_src: list[str] = field(repr=False)
    valid_ref: list[str] = field(repr=False)
    fingerprint: str

    def train_batches(self, *, max_tokens: int, seed: int = 0) -> TokenBatches:
        return TokenBatches(pairs=self.train, max_tokens=max_tokens, seed=seed)


def prepare_translation_data(cfg: TranslationDataConfig, run_dir: str | os.PathLike, *,
                          reuse_vocab: bool = False) -> TranslationData:
    """Read and split the pairs, train the joint vocabulary on the training pairs (or, with
    ``reuse_vocab``, load RUN/spm.model, which must exist: a resume), encode and filter."""
    if cfg.src is None or cfg.tgt is None:
        raise UsageError("data.src and data.tgt are required: the parallel training files "
                         "(--data.src=FILE --data.tgt=FILE)")
    src, tgt = read_sentence_pairs(cfg.src, cfg.tgt)
    paths = [cfg.src, cfg.tgt]
    if cfg.valid_src is not None:
        valid_src, valid_ref = read_sentence_pairs(cfg.valid_src, cfg.valid_tgt)
        paths += [cfg.valid_src, cfg.valid_tgt]
    else:
        if len(src) <= cfg.val_lines:
            raise UsageError(
                f"{cfg.src} has {len(src)} lines, not more than data.val_lines={cfg.val_lines} to hold out "
                f"for validation; give --valid-src/--valid-tgt or lower data.val_lines"
            )
        src, valid_src = src[:-cfg.val_lines], src[-cfg.val_lines:]
        tgt, valid_ref = tgt[:-cfg.val_lines], tgt[-cfg.val_lines:]
    run_dir = Path(run_dir)
    if reuse_vocab:
        if not (run_dir / SPM_FILE).is_file():
            raise FileNotFoundError(
                f"--resume needs the vocabulary the run was trained with, {run_dir / SPM_FILE}, and it is "
                f"missing; restore it (a new vocabulary would renumber the pieces), or start a new run with --out"
            )
        vocab = load_subword_vocab(run_dir)
    else:
        for path, lines in ((cfg.src, src), (cfg.tgt, tgt)):
            if not any(lines):
                raise UsageError(f"{path} has {len(lines)} lines and all are empty: there is no text to learn "
                                 f"a vocabulary from; check that --data.src and --data.tgt are the training files")
        vocab = train_subword_vocab(src + tgt, run_dir, cfg.vocab_size)
    return TranslationData(
        vocab=vocab,
        train=encode_pairs(vocab, src, tgt, max_len=cfg.max_len),
        valid=encode_pairs(vocab, valid_src, valid_ref, max_len=cfg.max_len),
        valid_src=valid_src,
        valid_ref=valid_ref,
        fingerprint=_fingerprint(paths, cfg.val_lines if cfg.valid_src is None else None),
    )


def _fingerprint(paths: Sequence[str], val_lines: int | None) -> str:
    digest = hashlib.sha256(repr(val_lines).encode())
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
