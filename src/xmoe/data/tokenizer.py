"""Byte-level BPE tokenizer (GPT-2 style, Radford et al. 2019) trained with HF ``tokenizers``.

Every byte is a token, so any text encodes and ``decode(encode(text)) == text`` exactly.
``<|endoftext|>`` (id 0) is the only special token; it follows every document in the token
stream. A literal ``<|endoftext|>`` inside the text also becomes that token.
Saved as ``tokenizer.json`` (the ``tokenizers`` format) in the run directory.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from xmoe.errors import UsageError

from .files import atomic_write_text

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"

# Long documents are cut into pieces of about this many characters so training and encoding
# run in parallel and memory stays bounded; ENCODE_GROUP pieces are encoded per call.
PIECE_CHARS = 1 << 16
ENCODE_GROUP = 64
# BPE training slows down with the square of a word's length (a word: a run without whitespace),
# so a megabyte-long run (minified code, base64, a text without spaces) would take hours. For
# training only, runs longer than this are cut into pieces of this length; merges then cannot
# span a cut, which changes nothing for ordinary text (no run near this long). Encoding is not
# cut: it is fast on long runs and must give the ids of the whole text.
MAX_TRAIN_RUN = 256
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAIN_RUN + 1},}}")
# A cut right after a newline between two non-space characters: the byte-level pre-tokenizer
# makes that newline a pre-token of its own either way, so the pieces encode to the same ids as
# the whole text (Python's \s is a superset of Unicode White_Space, so this errs safe).
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


class BPETokenizer:
    """A trained byte-level BPE tokenizer with ``<|endoftext|>`` as document separator."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        eot_id = tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise UsageError(f"the tokenizer has no {EOT} token; train it with BPETokenizer.train")
        self._tokenizer = tokenizer
        self.eot_id: int = eot_id

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    @classmethod
    def train(cls, documents: Iterable[str], *, vocab_size: int) -> BPETokenizer:
        """Learn up to ``vocab_size`` tokens (256 bytes, EOT, merges) from ``documents``.

        Each merge joins a pair of tokens that occurs in the text, so there are fewer merges
        than bytes of text: ``vocab_size`` is bounded by that before training (the tokenizers
        library would otherwise allocate for all of it, and abort on a huge value)."""
        documents = list(documents)
        vocab_size = min(vocab_size, 257 + sum(len(doc.encode("utf-8")) for doc in documents))
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=sys.stderr.isatty(),  # the trainer's own bars, on a terminal only
        )
        pieces = (run for doc in documents for piece in split_text(doc) for run in bounded_runs(piece))
        tokenizer.train_from_iterator(pieces, trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Read a ``tokenizer.json`` written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {str(path)!r}; give the run directory of a training run "
                f"(prepare_lm_data writes {TOKENIZER_FILE} there)"
            )
        return cls.from_str(path.read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_str(cls, text: str, *, source: str = "tokenizer JSON") -> BPETokenizer:
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise UsageError(f"{source!r} is not a valid tokenizer.json ({err})") from None
        return cls(tokenizer)

    def to_str(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` atomically (temporary file, then rename)."""
        atomic_write_text(Path(path), self.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special token included (may be below the requested size)."""
        return self._tokenizer.get_vocab_size()

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Smallest unsigned dtype holding every id: uint16 up to 65536 tokens, else uint32."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOT appended)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D sequence of ids (list, numpy array or CPU tensor); EOT stays visible."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if isinstance(ids, int):  # a 0-d array or tensor
            ids = [ids]
        if ids and isinstance(ids[0], list):
            raise UsageError("decode takes a 1-D sequence of ids; decode each row of a batch")
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def encode_documents(self, documents: Iterable[str]) -> np.ndarray:
        """One token stream: each document's ids followed by EOT, as ``self.dtype``."""
        eot = np.array([self.eot_id], dtype=self.dtype)
        parts: list[np.ndarray] = []
        pieces: list[str] = []
        ends_document: list[bool] = []

        def flush() -> None:
            encodings = self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
            for encoding, last in zip(encodings, ends_document):
                parts.append(np.asarray(encoding.ids, dtype=self.dtype))
                if last:
                    parts.append(eot)
            pieces.clear()
            ends_document.clear()

        for doc in documents:
            doc_pieces = list(split_text(doc))
            pieces += doc_pieces
            ends_document += [False] * (len(doc_pieces) - 1) + [True]
            if len(pieces) >= ENCODE_GROUP:
                flush()
        flush()
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def bounded_runs(text: str, max_run: int = MAX_TRAIN_RUN) -> Iterator[str]:
    """``text`` in pieces, cut inside runs of non-whitespace longer than ``max_run`` so that
    no run in a piece is longer (the pieces join back to ``text``)."""
    start = 0
    pattern = _LONG_RUN if max_run == MAX_TRAIN_RUN else re.compile(rf"\S{{{max_run + 1},}}")
    for match in pattern.finditer(text):
        for cut in range(match.start() + max_run, match.end(), max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at least ``piece_chars`` characters (the last may be shorter), cut
    only where encoding the pieces gives the same ids as encoding the whole."""
    start = 0
    while len(text) - start > piece_chars:
        match = _SAFE_CUT.search(text, start + piece_chars)
        if match is None:
            break
        yield text[start : match.start()]
        start = match.start()
    yield text[start:]
