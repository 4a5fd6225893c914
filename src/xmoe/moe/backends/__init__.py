"""Backends: interchangeable implementations of the experts' computation, chosen by name.

Two kinds, with two signatures (``Backend.stage`` tells them apart):

    grouped   ``run(experts, x_ND, groups) -> y_ND``: rows already grouped by expert (the
              dispatcher gathered them) through their experts, in the compute dtype. The layer
              then combines. Works behind any dispatcher, expert parallelism included.
    stage     ``run(experts, x_TD, plan) -> out_TD`` (fp32): a named override of the whole
              dispatch -> experts -> combine stage, for implementations that fuse the gather
              and the weighted scatter-add into the expert computation. Local experts only.

    "loop"        grouped; the plain reference: one GEMM chain per expert on its slice, autograd
                  does the rest. Any device, any dtype. Needs the host counts.
    "grouped_mm"  grouped; torch.nn.functional.grouped_mm for all experts at once, no Python loop
                  over experts. No host counts needed (static mode). Fast on CUDA sm90/sm100 in
                  bf16 (torch's CUTLASS kernel); elsewhere torch falls back to a per-expert loop.
    "fused"       stage; gather, MLP and weighted scatter-add a few experts at a time with a
                  hand-written backward (no [N, D] temporaries). The fastest on CPU.
    "triton"      stage; one Triton kernel per projection for a variable number of experts per
                  token (backends/triton_moe.py). CUDA, or CPU under TRITON_INTERPRET=1 (tests).

``auto`` (``choose``) picks by what the device can do, in one table:

    CPU                                  fused; static mode: grouped_mm
    CUDA, sm90/sm100, bf16               grouped_mm (torch's fast grouped GEMM exists there)
    other CUDA                           fused; static mode: triton (grouped_mm's fallback there
                                         reads the offsets on the host, which static mode forbids)
    expert parallelism                   a grouped backend: grouped_mm where fast, else loop

The Triton kernel is not picked by ``auto`` until a GPU measurement shows it faster
(benchmarks/gpu.py prints the comparison); ask for it by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from xmoe.errors import UsageError

from .fused import fused_backend
from .grouped import compute_dtype, grouped_mm_backend, grouped_mm_fast, grouped_mm_problem
from .loop import loop_backend
from .triton_stage import triton_backend, triton_problem

log = logging.getLogger("xmoe.moe")


def _anywhere(experts, x: Tensor) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    stage: bool  # True: replaces dispatch + experts + combine; False: grouped rows -> rows
    static: bool  # runs without the host counts (static mode)
    problem: Callable[[object, Tensor], str | None] = _anywhere  # why it cannot run on x; None: it can


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("loop", loop_backend, stage=False, static=False),
        Backend("grouped_mm", grouped_mm_backend, stage=False, static=True, problem=grouped_mm_problem),
        Backend("fused", fused_backend, stage=True, static=False),
        Backend("triton", triton_backend, stage=True, static=True, problem=triton_problem),
    )
}

# A stage backend under expert parallelism runs its grouped equivalent (same math).
GROUPED_EQUIVALENT = {"fused": "loop", "triton": "grouped_mm"}


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}") from None


def choose(name: str, experts, x: Tensor, *, static: bool = False, local: bool = True) -> Backend:
    """The backend that will run ``experts`` on ``x``: ``name``, or what ``auto`` picks.

    Raises UsageError (a ValueError: the setting is the user's) when the named backend cannot
    run here, naming what to use instead.
    """
    if static and not local:
        raise UsageError("static_shapes=True cannot run under expert parallelism (the exchange sizes are "
                         "read on the host); build the model with static_shapes=False")
    if name == "auto":
        name = auto_backend(experts, x, static=static, local=local)
        if not torch.compiler.is_compiling():  # logging would break the graph
            _announce(name, str(x.device), str(compute_dtype(x)), static)
    elif not local and get(name).stage:
        name = GROUPED_EQUIVALENT[name]
    backend = get(name)
    problem = backend.problem(experts, x)
    if problem:
        raise UsageError(f"model.moe.backend={backend.name!r} cannot run here: {problem}")
    if static and not backend.static:
        raise UsageError(
            f"backend={backend.name!r} reads the per-expert counts on the host, which static_shapes=True "
            f"forbids; use backend='grouped_mm' (or 'triton' on a GPU), or 'auto'"
        )
    if static and backend.name == "grouped_mm" and x.device.type == "cuda" and not grouped_mm_fast(experts, x):
        raise UsageError(
            "backend='grouped_mm' with static_shapes=True on this GPU would sync: torch's fast grouped GEMM "
            "runs only on sm90/sm100 in bfloat16 (elsewhere it reads the offsets on the host); run under "
            "bf16 autocast on such a GPU, or use backend='triton'"
        )
    return backend


def auto_backend(experts, x: Tensor, *, static: bool = False, local: bool = True) -> str:
    """The table in this module's docstring."""
    if x.device.type == "cuda" and grouped_mm_fast(experts, x):
        return "grouped_mm"
    if not local:
        return "loop"
    if not static:
        return "fused"
    if x.device.type == "cuda":
        if triton_problem(experts, x) is None:
            return "triton"
        raise UsageError(
            "static_shapes=True on this GPU needs the Triton kernel (pip install 'xmoe[triton]'): "
            "torch's grouped_mm has its fast kernel only on sm90/sm100 in bfloat16"
        )
    return "grouped_mm"


@lru_cache(maxsize=None)
def _announce(name: str, device: str, dtype: str, static: bool) -> None:
    """One log line per choice (cached: a model of many layers says it once)."""
    log.info("xmoe: backend='auto' runs the experts with %r on %s %s%s", name, device, dtype,
             " (static shapes)" if static else "")
