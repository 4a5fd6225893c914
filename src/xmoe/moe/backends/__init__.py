"""Backends: interchangeable kernels that run the experts on their grouped rows.

Each backend is ``fn(experts, x_ND, plan) -> y_ND``: the same inputs, the same weight layout
(experts.py), the same result up to floating-point rounding. Tests hold every one of them to a
naive per-token loop.

    "loop"        one GEMM chain per expert on its contiguous slice of rows. Plain, works on
                  every device and dtype; the reference. On CPU it runs at the dense GEMM rate.
    "grouped_mm"  torch.nn.functional.grouped_mm: one kernel for all experts (CUDA bf16 on
                  sm80+, and CPU); no Python loop over experts.
    "auto"        the faster of the two for the input's device and dtype, as measured by
                  benchmarks/layer.py (see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .grouped import compute_dtype, grouped_mm_backend, grouped_mm_problem
from .loop import loop_backend

BACKENDS: dict[str, Callable] = {"loop": loop_backend, "grouped_mm": grouped_mm_backend}


def get_backend(name: str, experts, x: Tensor) -> Callable:
    """The backend called ``name``; ``"auto"`` picks one for ``x``'s device and dtype."""
    if name == "auto":
        name = auto_backend(experts, x)
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}") from None


def auto_backend(experts, x: Tensor) -> str:
    if x.device.type == "cuda" and compute_dtype(x) == torch.bfloat16 and not grouped_mm_problem(experts, x):
        return "grouped_mm"
    return "loop"
