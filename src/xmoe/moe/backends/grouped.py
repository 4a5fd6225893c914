"""The "grouped_mm" backend: all experts in one ``torch.nn.functional.grouped_mm`` per matrix
(on rows the dispatcher gathered; it combines the results: backends/__init__.py).

Rows are grouped by ``groups.offsets_E`` (int32 end offsets, on the device), so nothing is read
to the host: this backend runs in static mode. Biases are per expert, so they are gathered per
row (``b[expert_idx_N]``) and added; grouped_mm's own ``bias`` is shared by all groups.

Static mode pads the rows past ``offsets_E[-1]``; grouped_mm leaves those rows of its output
(and of its input gradient) unwritten. Each projection's result is masked with ``torch.where``
(never multiplied by 0: uninitialised memory may hold NaN), so padding contributes nothing
forward and receives nothing backward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..experts import compute_dtype
from .loop import loop_rows

# torch's fast grouped GEMM (CUTLASS) exists for these compute capabilities, in bfloat16;
# elsewhere grouped_mm falls back to a loop over groups that reads the offsets on the host.
FAST_CAPABILITIES = ((9, 0), (10, 0))


def grouped_mm_problem(experts, x: Tensor) -> str | None:
    """Why grouped_mm cannot run these experts on x, or None when it can."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (torch >= 2.9 has); use backend='loop'"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "grouped_mm needs a CUDA GPU of compute capability 8.0 or newer; use backend='loop'"
    if x.device.type not in ("cuda", "cpu"):
        return f"grouped_mm does not run on {x.device.type}; use backend='loop'"
    dtype = compute_dtype(x)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm takes float32, bfloat16 or float16, not {dtype}; use backend='loop'"
    itemsize = dtype.itemsize
    dims = {"model_dim": experts.w1.shape[1], "expert_dim": experts.w1.shape[2]}
    for name, size in dims.items():
        if size * itemsize % 16:
            return (f"grouped_mm needs rows of a multiple of 16 bytes; {name}={size} is not "
                    f"({itemsize}-byte dtype); use backend='loop'")
    return None


def grouped_mm_fast(experts, x: Tensor) -> bool:
    """Whether torch's fast grouped GEMM kernel runs these experts on x (CUDA sm90/sm100, bf16)."""
    return (
        x.device.type == "cuda"
        and torch.cuda.get_device_capability(x.device) in FAST_CAPABILITIES
        and compute_dtype(x) == torch.bfloat16
        and grouped_mm_problem(experts, x) is None
    )


def grouped_mm_rows(experts, x_ND: Tensor, groups) -> Tensor:
    """[N, D] rows grouped by expert -> [N, D] expert outputs, in the compute dtype."""
    if x_ND.shape[0] == 0:  # grouped_mm rejects an empty operand; the loop keeps the graph
        return loop_rows(experts, x_ND, dataclasses.replace(groups, counts=(0,) * experts.num_experts))
    dtype = compute_dtype(x_ND)  # grouped_mm is not on autocast's list: cast by hand
    w = experts.weights(dtype)
    valid = None if groups.valid_N is None else groups.valid_N.unsqueeze(-1)
    x_ND = _masked(x_ND.to(dtype), valid).contiguous()
    up = _grouped(x_ND, w.w1, w.b1, groups, valid)
    gate = _grouped(x_ND, w.w3, w.b3, groups, valid) if w.w3 is not None else None
    return _grouped(experts.hidden(up, gate).contiguous(), w.w2, w.b2, groups, valid)


def _grouped(x: Tensor, w: Tensor, b: Tensor | None, groups, valid: Tensor | None) -> Tensor:
    y = F.grouped_mm(x, w, offs=groups.offsets_E)
    y = y if b is None else y + b.index_select(0, groups.expert_idx_N)
    return _masked(y, valid)


def _masked(t: Tensor, valid: Tensor | None) -> Tensor:
    return t if valid is None else torch.where(valid, t, 0)
