"""Small deterministic English-like text for the data tests."""

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
