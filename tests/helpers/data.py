"""Small deterministic text for the tests: English-like lines, and the tiny corpus runs train on."""

from __future__ import annotations

import random

WORDS = (
    "the expert router sends each token to a small set of experts whose probabilities add up "
    "to the threshold while the capacity keeps every expert from taking more than its share "
    "of the batch and the loss keeps the load balanced across devices"
).split()


def english(num_lines: int, *, seed: int = 0) -> str:
    """``num_lines`` lines of 5-12 words with some punctuation; the same for the same seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(".,;:!?") + "\n")
    return "".join(lines)


ROUTING_WORDS = "the quick brown fox jumps over the lazy dog while experts route tokens".split()


def write_corpus(path, *, num_lines: int = 600, words: list[str] = ROUTING_WORDS, length: int = 12):
    """``path`` filled with ``num_lines`` lines of ``length`` words drawn with torch's seed 0
    (the tiny corpus the training and CLI tests train on); returns ``path``."""
    import torch

    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (length,), generator=gen))
             for _ in range(num_lines)]
    path.write_text("\n".join(lines))
    return path
