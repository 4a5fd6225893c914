"""Every test in tests/mt starts from the same seed; toy parallel data made here."""

import pytest
import torch

from helpers.mt import write_toy_corpus


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 0, and one thread: at these tiny shapes a second thread only adds synchronisation
    (and on a busy shared machine, a lot of it). The thread count is restored after."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_files(tmp_path):
    """Train and validation files of the toy task: {"train": (src, tgt), "valid": (src, tgt)}."""
    return {
        "train": write_toy_corpus(tmp_path / "train", 600, seed=0),
        "valid": write_toy_corpus(tmp_path / "valid", 30, seed=1),
    }
