"""Every test in tests/conversion starts from the same seed, on one thread (the tensors are tiny:
on a shared 2-core machine a second thread only adds waiting)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
