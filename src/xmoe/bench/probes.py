"""Probes for what a layer call costs besides time: eager ops and host syncs.

    with CountOps() as ops: layer(x)          # ops.count: aten ops dispatched (GPU: kernel launches)
    with cuda_syncs() as syncs: layer(x)      # len(syncs): syncs torch's own CUDA detector reported
    with HostReads() as reads: train(...)     # reads.sites: the file:line that asked for each host read

Used by the benchmarks (benchmarks/gpu.py, benchmarks/ab.py) and the tests that hold the layer to
its sync budget.
"""

from __future__ import annotations

import contextlib
import sys
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


# Ops whose result the host must wait for: a Python scalar or a data-dependent shape.
HOST_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


class HostReads(TorchDispatchMode):
    """Records every host read inside the context, on any device (a CPU proxy for CUDA syncs):
    the ops of HOST_READ_OPS and ``Tensor.tolist`` (which does not pass the dispatcher). Each is
    recorded as the ``path:line`` of the Python code that asked for it, so a caller can tell the
    reads of its own code from those inside torch (e.g. Adam's step counter, a CPU tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READ_OPS:
            self.sites.append(_caller())
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        sites, tolist = self.sites, self._tolist

        def counting_tolist(tensor):
            sites.append(_caller())
            return tolist(tensor)

        torch.Tensor.tolist = counting_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


_MACHINERY = (__file__, "torch/utils/_python_dispatch", "torch/_dynamo/", "torch/_compile.py")


def _caller() -> str:
    """path:line of the innermost frame outside this file and torch's dispatch and dynamo wrappers."""
    frame = sys._getframe(2)
    while frame is not None and any(part in frame.f_code.co_filename for part in _MACHINERY):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
