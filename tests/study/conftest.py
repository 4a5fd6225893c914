"""Shared fixtures for the study tests: a tiny corpus and a private token cache."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog while experts route tokens to small experts".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    return path


@pytest.fixture(scope="session", autouse=True)
def private_token_cache(tmp_path_factory):
    """Token arrays go to a temporary cache, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin at every barrier while the
    other core is busy (a 2-step debug study took 31 s instead of 6 s). Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
