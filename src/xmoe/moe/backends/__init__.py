"""Backends: interchangeable implementations of the experts' computation, chosen by name.

One signature for all, the whole dispatch -> experts -> combine stage of a layer call:

    run(experts, x_TD, plan, dispatcher) -> out_TD     [T, D] fp32, the weighted sum of each
                                                       token's kept experts (``y = sum_e p_e FFN_e(x)``)

A backend that computes rows grouped by expert (``rows(experts, x_ND, groups) -> y_ND``) is
made one with ``through_dispatcher``: the dispatcher gathers the rows (sending them to the ranks
that hold their experts, under expert parallelism) and combines the results. Such backends run
behind any dispatcher. The others gather, compute and combine in one (``Backend.local``): they
need every expert in this process.

    "loop"        rows; the plain reference: one GEMM chain per expert on its slice, autograd
                  does the rest. Any device, any dtype. Needs the host counts.
    "grouped_mm"  rows; torch.nn.functional.grouped_mm for all experts at once, no Python loop
                  over experts. No host counts needed (static mode). Fast on CUDA sm90/sm100 in
                  bf16 (torch's CUTLASS kernel); elsewhere torch falls back to a per-expert loop.
    "fused"       local; gather, MLP and weighted scatter-add a few experts at a time with a
                  hand-written backward (no [N, D] temporaries). The fastest on CPU.
    "direct"      local; the small-T path: each kept expert's GEMV chain on its tokens, added
                  straight into the output, with none of the per-call machinery the others
                  amortise over many tokens (backends/direct.py). The fastest for a few tokens.
                  At inference on a CPU the layer runs its GEMM chains from a plan made on
                  the host instead (decode.py: no mask, no sort, no scatter).
    "triton"      local; one Triton kernel per projection for a variable number of experts per
                  token (backends/triton_moe.py). CUDA, or CPU under TRITON_INTERPRET=1 (tests).

``auto`` (``choose``) picks by what the device can do and the call's size, in one table:

    CPU, at most DIRECT_MAX_TOKENS tokens  direct (decoding; measured in benchmarks/README.md)
    CPU                                    fused; static mode: grouped_mm
    CUDA, sm90/sm100, bf16                 grouped_mm (torch's fast grouped GEMM exists there)
    other CUDA                             fused; static mode: triton (grouped_mm's fallback there
                                           reads the offsets on the host, which static mode forbids)
    expert parallelism                     a rows backend: grouped_mm where fast, else loop

A local backend named under expert parallelism runs its rows equivalent (same math), with a
warning; ``auto`` says what it picked in one log line per choice.

The Triton kernel is not picked by ``auto`` until a GPU measurement shows it faster
(benchmarks/gpu.py prints the comparison); ask for it by name.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from xmoe.errors import UsageError

from ..experts import compute_dtype
from .direct import direct_backend
from .fused import fused_backend
from .grouped import grouped_mm_fast, grouped_mm_problem, grouped_mm_rows
from .loop import loop_rows
from .triton_stage import triton_backend, triton_problem

log = logging.getLogger("xmoe.moe")


def _anywhere(experts, x: Tensor) -> str | None:
    return None


def through_dispatcher(rows: Callable) -> Callable:
    """The backend of a function of rows grouped by expert, ``rows(experts, x_ND, groups) ->
    y_ND``: the dispatcher gathers the rows and combines what the experts made of them."""

    def run(experts, x_TD: Tensor, plan, dispatcher) -> Tensor:
        return dispatcher.combine(rows(experts, dispatcher.dispatch(x_TD, plan), plan.groups), plan)

    return run


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable  # (experts, x_TD, plan, dispatcher) -> [T, D] fp32
    local: bool  # gathers and combines itself: every expert must be in this process
    static: bool  # runs without the host counts (static mode)
    problem: Callable[[object, Tensor], str | None] = _anywhere  # why it cannot run on x; None: it can


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("loop", through_dispatcher(loop_rows), local=False, static=False),
        Backend("grouped_mm", through_dispatcher(grouped_mm_rows), local=False, static=True,
                problem=grouped_mm_problem),
        Backend("fused", fused_backend, local=True, static=False),
        Backend("triton", triton_backend, local=True, static=True, problem=triton_problem),
        Backend("direct", direct_backend, local=True, static=False),  # the small-T path; auto picks it by size
    )
}

# A local backend under expert parallelism runs its rows equivalent (same math).
ROWS_EQUIVALENT = {"fused": "loop", "direct": "loop", "triton": "grouped_mm"}

# Up to this many tokens per call, ``auto`` runs "direct" on a CPU (measured in benchmarks/README.md).
DIRECT_MAX_TOKENS = 16


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
            _announce(name, str(x.device), str(compute_dtype(x)), static, local)
    elif not local and get(name).local:
        _warn_rows_equivalent(name)
        name = ROWS_EQUIVALENT[name]
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


def choice_key(x: Tensor) -> tuple:
    """What ``auto``'s choice for a layer depends on in its input: device, compute dtype, size."""
    return x.device, compute_dtype(x), x.shape[0] <= DIRECT_MAX_TOKENS


def auto_backend(experts, x: Tensor, *, static: bool = False, local: bool = True) -> str:
    """The table in this module's docstring."""
    if x.device.type == "cuda" and grouped_mm_fast(experts, x):
        return "grouped_mm"
    if not local:
        return "loop"
    if not static:
        return "direct" if x.device.type == "cpu" and x.shape[0] <= DIRECT_MAX_TOKENS else "fused"
    if x.device.type == "cuda":
        if triton_problem(experts, x) is None:
            return "triton"
        raise UsageError(
            "static_shapes=True on this GPU needs the Triton kernel (pip install 'xmoe[triton]'): "
            "torch's grouped_mm has its fast kernel only on sm90/sm100 in bfloat16"
        )
    return "grouped_mm"


@lru_cache(maxsize=None)
def _announce(name: str, device: str, dtype: str, static: bool, local: bool = True) -> None:
    """One log line per choice (cached: a model of many layers says it once)."""
    log.info("xmoe: backend='auto' runs the experts with %r on %s %s%s%s", name, device, dtype,
             " (static shapes)" if static else "", "" if local else " (experts spread over ranks)")


def _warn_rows_equivalent(name: str) -> None:
    """A local backend cannot run under expert parallelism (said once per layer and input kind)."""
    rows = ROWS_EQUIVALENT[name]
    warnings.warn(
        f"backend={name!r} gathers and combines in one process, but the experts are spread over ranks: "
        f"the layer runs {rows!r} (the same math); ask for {rows!r} or 'auto' to silence this",
        stacklevel=3,
    )
