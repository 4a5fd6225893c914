"""Language-model batches of contiguous token windows: ``x = t[s : s+L]``, ``y = t[s+1 : s+L+1]``.

Train batch ``i`` is a pure function of ``(seed, i)``: its B window starts are drawn uniformly
(with replacement) from every valid start by a generator seeded with ``SeedSequence([seed, i])``.
There is no iterator state, so a run resumed at step ``i`` sees exactly the batches an
uninterrupted run would have seen (for a given numpy version).

Validation batches are a fixed sequence: non-overlapping windows at ``0, L, 2L, ...`` in order,
B per batch (the last batch may have fewer rows), covering all but at most L tokens of the tail.

Shapes: B batch size, L sequence length. Batches are int64 CPU tensors; the training loop moves
them to its device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from xmoe.errors import UsageError, check_counts


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainBatches:
    """Random training windows; ``batch(i)`` depends only on ``(seed, i)`` and the tokens."""

    tokens: np.ndarray = field(repr=False)
    batch_size: int
    seq_len: int
    seed: int = 0
    name: str = "the train tokens"

    def __post_init__(self) -> None:
        _check_tokens(self.tokens, "TrainBatches")
        check_counts("TrainBatches", batch_size=self.batch_size, seq_len=self.seq_len)
        check_counts("TrainBatches", minimum=0, seed=self.seed)
        needed = self.batch_size * self.seq_len + 1
        if len(self.tokens) < needed:
            raise UsageError(
                f"{self.name} has {len(self.tokens)} tokens, too few for one batch: "
                f"batch_size={self.batch_size} x seq_len={self.seq_len} needs at least "
                f"{needed}; use a larger corpus or a smaller batch_size or seq_len"
            )

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``i`` as ``(x_BL, y_BL)``; the same for every object with these settings."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
            raise UsageError(f"batch index must be a non-negative integer, got {i!r}")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(i)])))
        num_starts = len(self.tokens) - self.seq_len  # s + L <= len - 1 keeps y in range
        starts_B = rng.integers(0, num_starts, size=self.batch_size)
        return _windows(self.tokens, starts_B, self.seq_len)

    def iter_from(self, step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``step, step + 1, ...`` without end (resume a run by passing its step)."""
        i = step
        while True:
            yield self.batch(i)
            i += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)


@dataclass(frozen=True, kw_only=True, eq=False)
class ValBatches:
    """Non-overlapping validation windows in order, ``batch_size`` per batch; a fixed sequence.

    ``max_batches`` keeps only the first batches (None: all of them).
    """

    tokens: np.ndarray = field(repr=False)
    batch_size: int
    seq_len: int
    max_batches: int | None = None
    name: str = "the validation tokens"

    def __post_init__(self) -> None:
        _check_tokens(self.tokens, "ValBatches")
        check_counts("ValBatches", batch_size=self.batch_size, seq_len=self.seq_len)
        if self.max_batches is not None:
            check_counts("ValBatches", max_batches=self.max_batches)
        if len(self.tokens) < self.seq_len + 1:
            raise UsageError(
                f"{self.name} has {len(self.tokens)} tokens, too few for one validation window: "
                f"seq_len={self.seq_len} needs at least {self.seq_len + 1}; use a larger corpus, "
                f"a larger val_fraction or a smaller seq_len"
            )

    @property
    def num_windows(self) -> int:
        """Windows of the full sequence (before ``max_batches``)."""
        return (len(self.tokens) - 1) // self.seq_len

    def __len__(self) -> int:
        full = math.ceil(self.num_windows / self.batch_size)
        return full if self.max_batches is None else min(full, self.max_batches)

    def batch(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch ``j`` (``0 <= j < len(self)``) as ``(x_BL, y_BL)``."""
        if not 0 <= j < len(self):
            raise IndexError(f"validation batch {j} out of range; there are {len(self)}")
        first = j * self.batch_size
        last = min(first + self.batch_size, self.num_windows)
        starts_B = np.arange(first, last) * self.seq_len
        return _windows(self.tokens, starts_B, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batch(j) for j in range(len(self)))


def _windows(
    tokens: np.ndarray, starts_B: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_BL = tokens[s : s+L]`` and ``y_BL = tokens[s+1 : s+L+1]`` for each start s."""
    index_BL1 = starts_B[:, None] + np.arange(seq_len + 1)
    windows_BL1 = torch.from_numpy(tokens[index_BL1].astype(np.int64))
    return windows_BL1[:, :-1].contiguous(), windows_BL1[:, 1:].contiguous()


def _check_tokens(tokens: np.ndarray, owner: str) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise UsageError(
            f"{owner}.tokens must be a 1-D numpy array of integer token ids (e.g. "
            f"LMData.train_tokens), got {type(tokens).__name__} "
            f"{getattr(tokens, 'shape', '')} {getattr(tokens, 'dtype', '')}"
        )
