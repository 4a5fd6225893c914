"""The "grouped_mm" backend: all experts in one ``torch.nn.functional.grouped_mm`` per matrix.

Rows are grouped by ``plan.offsets_E`` (int32 end offsets). Biases are per expert, so they are
gathered per row (``b[expert_idx_N]``) and added; grouped_mm's own ``bias`` is shared by all
groups and cannot express that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import combine, dispatch


def grouped_mm_problem(experts, x: Tensor) -> str | None:
    """Why grouped_mm cannot run these experts on x, or None when it can."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (torch >= 2.9 has)"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "grouped_mm needs a CUDA GPU of compute capability 8.0 or newer"
    if x.device.type not in ("cuda", "cpu"):
        return f"grouped_mm does not run on {x.device.type}"
    dtype = compute_dtype(x)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm takes float32, bfloat16 or float16, not {dtype}"
    itemsize = dtype.itemsize
    dims = {"model_dim": experts.w1.shape[1], "expert_dim": experts.w1.shape[2]}
    for name, size in dims.items():
        if size * itemsize % 16:
            return f"grouped_mm needs rows of a multiple of 16 bytes; {name}={size} is not ({itemsize}-byte dtype)"
    return None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert matmuls will run in: autocast's, when it is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_backend(experts, x_TD: Tensor, plan) -> Tensor:
    return combine(_run_experts(experts, dispatch(x_TD, plan), plan), plan, x_TD.shape[0])


def _run_experts(experts, x_ND: Tensor, plan) -> Tensor:
    problem = grouped_mm_problem(experts, x_ND)
    if problem:
        raise ValueError(f"backend='grouped_mm' cannot run here: {problem}. Use backend='loop' or 'auto'")
    if x_ND.shape[0] == 0:  # grouped_mm rejects an empty operand
        return x_ND.new_empty(0, experts.w2.shape[-1])
    dtype = compute_dtype(x_ND)  # grouped_mm is not on autocast's list: cast by hand
    x_ND = x_ND.to(dtype).contiguous()
    up = _grouped(x_ND, experts.w1, experts.b1, plan, dtype)
    gate = _grouped(x_ND, experts.w3, experts.b3, plan, dtype) if experts.w3 is not None else None
    return _grouped(experts.hidden(up, gate).contiguous(), experts.w2, experts.b2, plan, dtype)


def _grouped(x: Tensor, w: Tensor, b: Tensor | None, plan, dtype: torch.dtype) -> Tensor:
    y = F.grouped_mm(x, w.to(dtype), offs=plan.offsets_E)
    return y if b is None else y + b.to(dtype).index_select(0, plan.expert_idx_N)
