"""Every test in tests/hf: one thread, a fixed seed, transformers' caches (remote-code modules)
in a temporary folder, progress bars off. Nothing is downloaded."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_and_seeded(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
