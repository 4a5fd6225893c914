"""Backends: interchangeable kernels that run the experts on their grouped rows.

Each backend is ``fn(experts, x_TD, plan) -> out_TD`` (fp32): it gathers the kept pairs' rows,
runs each expert on its own, and sums the weighted outputs per token. All take the same inputs
and the same weight layout (experts.py) and give the same result up to rounding; tests hold
every one of them to a naive float64 per-token loop.

    "loop"        the plain reference: dispatch(), one GEMM chain per expert on its slice,
                  combine(); autograd does the rest. Any device, any dtype.
    "fused"       gather, MLP and weighted scatter-add a few experts at a time (~2 MB of rows),
                  with a hand-written backward: no [N, D] temporaries. The fastest on CPU.
    "grouped_mm"  dispatch(), torch.nn.functional.grouped_mm for all experts at once, combine();
                  no Python loop over experts. For CUDA bf16 (sm80+); also runs on CPU.
    "auto"        the fastest for the input's device and dtype, as measured by
                  benchmarks/layer.py (see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .fused import fused_backend
from .grouped import compute_dtype, grouped_mm_backend, grouped_mm_problem
from .loop import loop_backend

BACKENDS: dict[str, Callable] = {"loop": loop_backend, "fused": fused_backend, "grouped_mm": grouped_mm_backend}


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
    return "fused"
