"""Probes for what a layer call costs besides time: eager ops and host syncs.

    with CountOps() as ops: layer(x)          # ops.count: aten ops dispatched (GPU: kernel launches)
    with cuda_syncs() as syncs: layer(x)      # len(syncs): syncs torch's own CUDA detector reported

Used by the benchmarks (benchmarks/gpu.py, benchmarks/ab.py) and the tests that hold the layer to
its sync budget.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_syncs():
    """The synchronizing CUDA operations inside the context, as torch's detector reports them
    (``torch.cuda.set_sync_debug_mode("warn")``): a list of warning messages."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [str(w.message) for w in record if "synchroniz" in str(w.message).lower()]
