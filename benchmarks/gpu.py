"""The GPU check: everything xmoe claims on a GPU, measured in one command that survives faults.

    PYTHONPATH=src timeout -k 10 560 python benchmarks/gpu.py --out $OUT --budget-s 450   # the device command
    PYTHONPATH=src python benchmarks/gpu.py --device cpu --quick --out /tmp/dry            # the dry run the tests do
    python benchmarks/gpu.py --plan                              # the sections and their predicted H100 times

Runs on the packages a GPU machine already has (torch with CUDA; Triton if present), installs
nothing and downloads nothing. The sections, in order of value (``--plan`` prints them):

- triton-*: the Triton backend (and static mode on it): correctness, host syncs, S1 times. First,
  in a child process, so that a kernel fault (which poisons a CUDA context) cannot take the run down.
- correctness: every other backend and static mode against a float64 reference computed on the
  CPU from the same weights and the layer's own routing decision (itself checked against the
  CPU's), in fp32 and under bf16 autocast: the output and every gradient; idle experts'
  gradients must be exactly zero.
- syncs: host syncs per forward and per backward, counted by torch's own detector
  (``torch.cuda.set_sync_debug_mode("warn")``). The budget: one per forward, none per backward,
  none at all in static mode.
- layer-*: bf16 layer times (xmoe.bench.layer) at S1, paper, small and large scale: every backend
  and static mode (eager) against the dense speed limit, top-8, the authors' C-slot scheme.
- graphs: static mode captured in a CUDA graph and replayed, against eager (static and the
  default backend), at decode sizes (T = 1, 4, 16, 64 tokens) and at S1, forward in eval mode;
  and at S1 forward+backward in training (``torch.cuda.make_graphed_callables``).
- decode: the decode benchmark's layers (xmoe.bench.decode: top-8, top-2, top-1, XMoE with a sharp
  and a soft router, GPT-2-small shapes) and the dense FFN of top-8's FLOPs, bf16, eval, at 1, 4 and
  16 tokens per call: eager, and static mode replayed from a CUDA graph (decoding on a GPU is
  launch-bound), each against the dense FFN timed the same way.
- compile-*: static mode under ``torch.compile(fullgraph=True, dynamic=False)``, the compile cache
  reset first so each shape gets its own static graph: compile time, time and peak memory.
- training: steps of bf16 training of 4-layer gpt2-dense, gpt2-topk-64x384 and gpt2-xmoe-64x384
  on random tokens: tokens/s, model FLOPs utilisation and experts per token.

How a run survives: each section runs under its own try/except and time limit and writes its rows
to ``results.json`` and ``results.md`` as soon as it has them (each file is replaced atomically,
so a run killed by ``timeout`` keeps every finished row); a section starts only while the budget
(``--budget-s``) has room for its predicted time and may run at most 3x that + 30 s; if a section
leaves the device unusable, the sections after it run in a fresh child process. Exit status: 0
when every check passed and no section failed, 1 otherwise, 143 when killed by SIGTERM.

``--quick`` shrinks every section to seconds (tiny shapes, a few steps, ``aot_eager`` instead of
inductor) for the dry run; on CPU the sections that need CUDA run up to the CUDA-only step and say
what they left out. ``--inject-fault SECTION[:error|poison|crash|hang]`` fails a section after its
first row, for the tests and for drills.

Shapes: T tokens, D model dim, F expert dim, E experts, C slots per expert.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.bench import decode as decode_bench
from xmoe.bench import layer as layer_bench
from xmoe.bench.probes import cuda_syncs
from xmoe.models.gpt import GPT, flops_breakdown, moe_flops_per_token
from xmoe.moe import MoEConfig, MoELayer
from xmoe.presets import get_preset

# Peak dense bf16 tensor-core FLOP/s, for model FLOPs utilisation (vendor datasheets).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}

CHECK = dict(model_dim=64, num_experts=8, expert_dim=32)  # the correctness layer (grouped_mm-friendly)
PARAMS = ("w1", "b1", "w2", "b2")
STATIC = dict(static_shapes=True, max_experts=4)
# (name, MoEConfig overrides): what the correctness and sync sections check, in this process and
# in the Triton child. Static mode names its backend: on a GPU in fp32 "auto" would pick Triton.
VARIANTS = [("loop", dict(backend="loop")), ("grouped_mm", dict(backend="grouped_mm")),
            ("fused", dict(backend="fused")), ("static", dict(STATIC, backend="grouped_mm"))]
TRITON_VARIANTS = [("triton", dict(backend="triton")), ("static, triton", dict(STATIC, backend="triton"))]
TARGET_K, SEED = 3.0, 0  # routers calibrated to 3 experts per token, as a trained one (xmoe.bench.layer)
DECODE_TOKENS = (1, 4, 16, 64)
QUICK_SHAPES = {  # --quick: tiny stand-ins; "paper" is S1 with 4x the tokens, its stand-in tiny with 2x
    "small": layer_bench.SHAPES["tiny"], "S1": layer_bench.SHAPES["tiny"],
    "large": layer_bench.Shape("tiny-x2", 512, 64, 32, 8, 2), "paper": layer_bench.Shape("tiny-x2", 512, 64, 32, 8, 2),
}
BF16_TOLERANCE, FP32_TOLERANCE = 2e-2, 1e-4
KILLED = 128 + signal.SIGTERM


# --- what a section is, and what stops one ------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every section measures on."""

    device: torch.device
    quick: bool
    faults: dict[str, str] = field(default_factory=dict)  # section -> injected fault kind

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def repeats(self) -> int:
        return 1 if self.quick else 7

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def shape(self, name: str) -> layer_bench.Shape:
        return QUICK_SHAPES[name] if self.quick else layer_bench.SHAPES[name]

    def tokens(self, num_tokens: int, model_dim: int) -> Tensor:
        """[T, D] bf16 random tokens on the device, the same for a given size."""
        gen = torch.Generator().manual_seed(SEED)
        return torch.randn(num_tokens, model_dim, generator=gen).to(self.device, torch.bfloat16)


@dataclass(frozen=True)
class Section:
    """One part of the check: ``measure`` yields rows as it has them, ``render`` makes them a table."""

    name: str
    title: str
    h100_s: float  # predicted seconds on one H100 (full run): the budget and the README's plan
    measure: Callable[[Context], Iterator[dict]]
    render: Callable[[list[dict]], str]
    checks: bool = False  # rows carry "ok"; a False fails the run
    child: bool = False  # runs in a child process (a kernel fault cannot take the run down)

    @property
    def cap_s(self) -> float:
        """The most a section may run on a GPU before it is stopped: 3x its prediction + 30 s."""
        return 3 * self.h100_s + 30


class Skip(Exception):
    """The section cannot run here; the message says why."""


class SectionTimeout(BaseException):
    """The section ran past its time limit (a BaseException, so no library handler swallows it)."""


class Terminated(BaseException):
    """SIGTERM: the command's ``timeout`` is ending the run."""


class InjectedFault(RuntimeError):
    """A fault --inject-fault asked for."""


class InjectedPoison(InjectedFault):
    """An injected fault that also leaves the device unusable, as a Triton fault does."""


# --- correctness ---------------------------------------------------------------------------------


def measure_correctness(ctx: Context, variants=VARIANTS) -> Iterator[dict]:
    for name, overrides in variants:
        for precision in ("fp32", "bf16"):
            yield {"variant": name, "precision": precision, **check_layer(ctx.device, overrides, precision)}


def check_layer(device: torch.device, overrides: dict, precision: str) -> dict:
    """One variant against the float64 reference; returns the worst errors and the verdicts
    (``ok`` None and the reason in ``skipped`` when the variant cannot run here)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**CHECK, threshold=0.9, capacity_factor=1.5, eval_capacity_factor=1.5,
                               min_capacity=1, **overrides)).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, CHECK["model_dim"], generator=gen)
    with torch.no_grad():
        layer.router.weight.mul_(4.0)
        x[:, 0] = 3.0
        layer.router.weight[-1, 0] = -20.0  # the last expert is never wanted: an idle expert
    x = x.to(device).requires_grad_(True)
    g = torch.randn(x.shape, generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        problem = cannot_run(layer, x)
        if problem:
            return {"ok": None, "skipped": problem}
        out = layer(x)
        (out.output.float() * g).sum().backward()
    decision = layer.route(x.detach())

    cpu_decision = _cpu_copy(layer).route(x.detach().cpu())
    ref_out, ref_grads = reference(layer, x.detach(), g, decision.kept_TE.cpu())
    errors = {"output": _rel(out.output, ref_out), "x": _rel(x.grad, ref_grads["x"]),
              "router": _rel(layer.router.weight.grad, ref_grads["router"])}
    errors.update({n: _rel(getattr(layer.experts, n).grad, ref_grads[n]) for n in PARAMS})
    idle = ~decision.kept_TE.any(dim=0)
    grads = [getattr(layer.experts, n).grad for n in PARAMS]
    idle_grads_zero = all(g is not None and float(g[idle].abs().max()) == 0.0 for g in grads) if idle.any() else None
    tolerance = BF16_TOLERANCE if precision == "bf16" else FP32_TOLERANCE
    result = {
        "errors": errors,
        "max_error": max(errors.values()),
        "tolerance": tolerance,
        "routing_equals_cpu": bool(torch.equal(decision.kept_TE.cpu(), cpu_decision.kept_TE)),
        "idle_expert": bool(idle.any()),
        "idle_grads_zero": idle_grads_zero,
    }
    ok = max(errors.values()) < tolerance and idle_grads_zero is not False and result["routing_equals_cpu"]
    return {**result, "ok": ok}


def cannot_run(layer: MoELayer, x: Tensor) -> str | None:
    """Why ``layer`` cannot run its backend on ``x`` here (under the autocast in force), or None."""
    try:
        layer.backend_for(x)
    except ValueError as e:
        return str(e)
    return None


def reference(layer: MoELayer, x, g, kept_TE) -> tuple:
    """float64 output and gradients (input, router, experts) for the kept pairs ``kept_TE``,
    one expert at a time on the CPU: y_t = sum over kept e of p_te FFN_e(x_t)."""
    ex = {n: getattr(layer.experts, n).detach().double().cpu().requires_grad_(True) for n in PARAMS}
    router = layer.router.weight.detach().double().cpu().requires_grad_(True)
    x64 = x.double().cpu().requires_grad_(True)
    probs = (x64 @ router.T).softmax(dim=-1)
    y = torch.zeros_like(x64)
    for e in range(kept_TE.shape[1]):
        rows = kept_TE[:, e].nonzero().squeeze(1)
        h = F.gelu(x64[rows] @ ex["w1"][e] + ex["b1"][e])
        y = y.index_add(0, rows, probs[rows, e, None] * (h @ ex["w2"][e] + ex["b2"][e]))
    (y * g.double().cpu()).sum().backward()
    return y.detach(), {"x": x64.grad, "router": router.grad, **{n: t.grad for n, t in ex.items()}}


def _rel(a: Tensor | None, b: Tensor) -> float:
    """Largest error relative to the reference's largest magnitude (inf: no gradient at all)."""
    if a is None:
        return float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _cpu_copy(layer: MoELayer) -> MoELayer:
    cpu = MoELayer(dataclasses.replace(layer.cfg, backend="loop", static_shapes=False, check_finite=None))
    cpu.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    return cpu.train(layer.training)


# --- host syncs ------------------------------------------------------------------------------------


def measure_syncs(ctx: Context, variants=VARIANTS, shape: layer_bench.Shape | None = None) -> Iterator[dict]:
    for name, overrides in variants:
        yield {"variant": name, **count_syncs(ctx.device, overrides, shape or ctx.shape("small"))}


def count_syncs(device: torch.device, overrides: dict, shape: layer_bench.Shape) -> dict:
    """Syncs torch's detector reports in one forward and one backward (after a warm-up), and
    whether they keep the budget: one per forward, none per backward; none in static mode.
    Off CUDA the same calls run, uncounted (the detector exists on CUDA only)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=shape.model_dim, num_experts=shape.num_experts, expert_dim=shape.expert_dim,
                               threshold=0.9, capacity_factor=8.0, eval_capacity_factor=8.0, **overrides)).to(device)
    x = torch.randn(shape.tokens, shape.model_dim, device=device, requires_grad=True)
    counting = cuda_syncs if device.type == "cuda" else contextlib.nullcontext
    with torch.autocast(device.type, dtype=torch.bfloat16):
        problem = cannot_run(layer, x)
        if problem:
            return {"forward": None, "backward": None, "ok": None, "skipped": problem}
        if device.type == "cuda":
            layer(x).output.float().sum().backward()  # warm-up: lazy initialisation may sync
        with counting() as forward:
            out = layer(x)
        with counting() as backward:
            out.output.float().sum().backward()
    if forward is None:
        return {"forward": None, "backward": None, "ok": None}
    counts = {"forward": len(forward), "backward": len(backward)}
    budget = 0 if overrides.get("static_shapes") else 1
    return {**counts, "ok": counts["forward"] <= budget and counts["backward"] == 0}


# --- layer times -------------------------------------------------------------------------------------


def measure_layer(ctx: Context, shape_name: str) -> Iterator[dict]:
    """xmoe.bench.layer at one shape in bf16: every backend but Triton (its own section), static
    mode eager (compiled: the compile sections), the baselines."""
    shape = ctx.shape(shape_name)
    x = torch.zeros(1, shape.model_dim, device=ctx.device, dtype=torch.bfloat16)
    backends = [b for b in layer_bench.runnable_backends(shape, x) if b != "triton"]
    rows = layer_bench.bench_shape(shape, device=ctx.device, dtype=torch.bfloat16, target_k=TARGET_K,
                                   repeats=ctx.repeats, seed=SEED, backends=backends, static=True)
    for row in rows:
        yield {**row, "static_rows": row["capacity"] * shape.num_experts,
               "kept_pairs": round(row["experts_per_token"] * shape.tokens)}


def render_layer(rows: list[dict]) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        layer_bench.print_table(rows)
    r = rows[0]
    return text.getvalue().rstrip("\n") + (
        f"\n\nStatic mode pads to E x C = {r['static_rows']} rows for about {r['kept_pairs']} kept pairs "
        f"({r['static_rows'] / max(r['kept_pairs'], 1):.1f}x): expect it slower than grouped_mm in eager mode; "
        "it exists for CUDA graphs and torch.compile (the graphs and compile sections).")


def measure_triton_times(ctx: Context) -> Iterator[dict]:
    """The Triton backend against grouped_mm and fused at S1, bf16, same weights, interleaved."""
    shape = triton_shape(ctx, "S1")
    x = ctx.tokens(shape.tokens, shape.model_dim)
    built = {b: layer_bench.build_layer(shape, "threshold", b, TARGET_K, x, SEED) for b in ("triton", "grouped_mm", "fused")}
    problem = cannot_run(built["triton"], x)
    if problem:
        raise Skip(problem)
    layers = dict(zip(built, same_weights(list(built.values()))))
    layers = {b: layer for b, layer in layers.items() if cannot_run(layer, x) is None}
    x.requires_grad_(True)
    leaves = [x, *(p for layer in layers.values() for p in layer.parameters())]
    for backward in (False, True):
        calls = {f"xmoe[{b}]": step(lambda l=layer: l(x).output, leaves, backward) for b, layer in layers.items()}
        ms = median_ms(calls, ctx)
        best_other = min((v for k, v in ms.items() if k != "xmoe[triton]"), default=math.nan)
        yield {"shape": shape.label, "pass": "fwd+bwd" if backward else "fwd", "ms": ms,
               "triton_vs_best_other": ms["xmoe[triton]"] / best_other}


def triton_shape(ctx: Context, name: str) -> layer_bench.Shape:
    """The Triton sections' shape: ``name``'s, with 32 tokens under Triton's CPU interpreter (the
    dry run), where one call at 256 tokens takes seconds."""
    shape = ctx.shape(name)
    return dataclasses.replace(shape, tokens=32) if os.environ.get("TRITON_INTERPRET") == "1" else shape


def same_weights(layers: list[MoELayer]) -> list[MoELayer]:
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    return layers


# --- timing helpers ----------------------------------------------------------------------------------


def step(fn: Callable[[], Tensor], leaves: list[Tensor], backward: bool) -> Callable[[], None]:
    """One call as the layer benchmark times it: the forward under no_grad, or forward and
    backward with fresh gradients (as optimizer.zero_grad() leaves them) and a real (not
    expanded) incoming gradient."""

    def forward() -> None:
        with torch.no_grad():
            fn()

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return forward_backward if backward else forward


def median_ms(calls: dict[str, Callable[[], None]], ctx: Context, inner: int = 1) -> dict[str, float]:
    """Median milliseconds per call, candidates interleaved (drift hits all alike), after one
    warm-up each (none in a --quick run, whose times mean nothing). Each sample times ``inner``
    calls back to back between two syncs: a decode-size call is a few microseconds of GPU work,
    and a sync per call would time the sync."""
    for fn in calls.values() if not ctx.quick else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ctx.repeats):
        for name, fn in calls.items():
            ctx.sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            ctx.sync()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def peak_mb(fn: Callable[[], None], ctx: Context) -> float | None:
    """Peak memory one call of ``fn`` allocates above what was already allocated (CUDA only)."""
    if not ctx.cuda:
        return None
    ctx.sync()
    base = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    fn()
    ctx.sync()
    return (torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20


# --- CUDA graphs --------------------------------------------------------------------------------------


def measure_graphs(ctx: Context) -> Iterator[dict]:
    """Static mode in a CUDA graph against eager, forward in eval mode at the decode sizes and at
    S1, then forward+backward in training at S1. Off CUDA every step but the capture runs."""
    shape = ctx.shape("S1")
    x = ctx.tokens(shape.tokens, shape.model_dim)
    static, eager = same_weights([layer_bench.build_layer(shape, "threshold", "auto", TARGET_K, x, SEED, static=s)
                                  for s in (True, False)])
    static.eval()
    eager.eval()
    for num_tokens in (*DECODE_TOKENS, shape.tokens):
        yield inference_graph_row(static, eager, x[:num_tokens], ctx)
    yield training_graph_row(static.train(), x, ctx)


def inference_graph_row(static: MoELayer, eager: MoELayer, x: Tensor, ctx: Context) -> dict:
    """One decode (or prefill) size: eager, eager static and static replayed from a CUDA graph."""
    row = _graph_row(static, x, "fwd (eval)")
    with torch.no_grad():
        expected = [static(x).output]
        calls = {"eager": lambda: eager(x), "eager static": lambda: static(x)}
        replay, got, status = captured(lambda: cuda_graph(lambda: static(x).output, ctx), ctx)
        if replay is not None:
            calls["CUDA graph"] = replay
        row["ms"] = median_ms(calls, ctx, inner=1 if ctx.quick else 20)
    return {**row, **graph_verdict(row["ms"], got, expected, status, ctx)}


def training_graph_row(static: MoELayer, x: Tensor, ctx: Context) -> dict:
    """Static mode forward+backward at S1 in training, eager against make_graphed_callables."""
    x = x.detach().requires_grad_(True)
    leaves = [x, *static.parameters()]
    row = _graph_row(static, x, "fwd+bwd (train)")
    expected = output_and_grad(lambda: static(x).output, x)
    calls = {"eager static": step(lambda: static(x).output, leaves, True)}
    replay, got, status = captured(lambda: graphed_training(static, x, leaves), ctx)
    if replay is not None:
        calls["CUDA graph"] = replay
    row["ms"] = median_ms(calls, ctx)
    return {**row, **graph_verdict(row["ms"], got, expected, status, ctx)}


def _graph_row(static: MoELayer, x: Tensor, kind: str) -> dict:
    """What static mode computes at this size: the kept pairs, and the rows it pads them to."""
    return {"tokens": x.shape[0], "pass": kind, "kept_pairs": int(static.route(x.detach()).kept_TE.sum()),
            "static_rows": static.router.max_pairs(x.shape[0])}


def captured(capture: Callable[[], tuple[Callable[[], None], list[Tensor]]], ctx: Context):
    """(replay, its outputs, status) of ``capture()`` where CUDA graphs exist; a capture that
    fails is recorded in the status, not raised, so the other sizes still run."""
    if not ctx.cuda:
        return None, None, "not captured: CUDA graphs need a CUDA device"
    try:
        replay, outputs = capture()
    except Exception as e:  # noqa: BLE001 - static mode failing to capture is the finding
        return None, None, f"capture failed: {type(e).__name__}: {e}"
    return replay, outputs, "captured"


def cuda_graph(fn: Callable[[], Tensor], ctx: Context) -> tuple[Callable[[], None], list[Tensor]]:
    """``fn`` captured in a CUDA graph: (replay, [the output tensor every replay rewrites]).
    Warm-up on a side stream first, as torch.cuda.graphs asks."""
    stream = torch.cuda.Stream(ctx.device)
    stream.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(ctx.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, [out]


def graphed_training(static: MoELayer, x: Tensor, leaves: list[Tensor]) -> tuple[Callable[[], None], list[Tensor]]:
    """A training step (forward+backward) of static mode through make_graphed_callables, and the
    output and input gradient it gives."""
    graphed = torch.cuda.make_graphed_callables(OutputOnly(static), (x,), allow_unused_input=True)
    return step(lambda: graphed(x), leaves, True), output_and_grad(lambda: graphed(x), x)


class OutputOnly(nn.Module):
    """The layer's output tensor alone: what make_graphed_callables can capture."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).output


def output_and_grad(fn: Callable[[], Tensor], x: Tensor) -> list[Tensor]:
    """fn's output and the input's gradient under a fixed incoming gradient."""
    x.grad = None
    out = fn()
    out.backward(torch.ones_like(out))
    return [out.detach().clone(), x.grad.clone()]


def graph_verdict(ms: dict[str, float], got: list[Tensor] | None, expected: list[Tensor], status: str,
                  ctx: Context) -> dict:
    """Whether the replayed graph computed what eager static mode does, and the speed-ups. A
    capture that failed on CUDA fails the check: static mode exists to be captured."""
    if got is None:
        return {"graph": status, "graph_error": None, "ok": False if ctx.cuda else None}
    ctx.sync()
    error = max(_rel(g, e) for g, e in zip(got, expected))
    return {"graph": status, "graph_error": error, "ok": error < BF16_TOLERANCE,
            "graph_vs_eager_static": ms["eager static"] / ms["CUDA graph"],
            "graph_vs_eager": ms["eager"] / ms["CUDA graph"] if "eager" in ms else None}


# --- decoding ----------------------------------------------------------------------------------------


def measure_decode(ctx: Context) -> Iterator[dict]:
    """Does a token that engages fewer experts take less time at decode on a GPU? The decode
    benchmark's layers (one set of experts, routers calibrated on the CPU) and its dense FFN, in
    bf16, at the decode sizes: eager (the default backend, one host sync per call) and static mode
    replayed from a CUDA graph, whose replay is checked against eager static mode (threshold
    routers capped at the shape's top-k experts per token in both, the bound static mode needs).
    Every candidate of a size is timed in one interleaved round."""
    shape = decode_bench.SHAPES["tiny" if ctx.quick else "gpt2"]
    moved = {"dtype": torch.bfloat16, "device": ctx.device}
    dense = decode_ffn(shape).to(**moved)
    layers = {}
    for name, layer in decode_bench.build_layers(shape, SEED).items():
        bound = {} if layer.cfg.router == "topk" else {"max_experts": shape.top_k}  # static mode's bound, for both
        eager, static = (MoELayer(dataclasses.replace(layer.cfg, static_shapes=s, **bound)).eval() for s in (False, True))
        for built in (eager, static):
            built.load_state_dict(layer.state_dict())
        layers[name] = (eager.to(**moved), static.to(**moved))
    for num_tokens in DECODE_TOKENS[:3]:
        x = ctx.tokens(num_tokens, shape.model_dim)
        with torch.no_grad():
            calls = {"dense eager": lambda: dense(x)}
            replay, _, _ = captured(lambda: cuda_graph(lambda: dense(x), ctx), ctx)
            if replay is not None:
                calls["dense CUDA graph"] = replay
            graphs = {}
            for name, (eager, static) in layers.items():
                calls[f"{name} eager"] = lambda eager=eager: eager(x)
                calls[f"{name} eager static"] = lambda static=static: static(x)
                graphs[name] = captured(lambda static=static: cuda_graph(lambda: static(x).output, ctx), ctx)
                if graphs[name][0] is not None:
                    calls[f"{name} CUDA graph"] = graphs[name][0]
            ms = median_ms(calls, ctx, inner=1 if ctx.quick else 20)
            for name, (eager, static) in layers.items():
                yield decode_row(name, static, x, ms, graphs[name], ctx)


def decode_ffn(shape: decode_bench.DecodeShape) -> nn.Module:
    """The dense FFN the decode benchmark compares with: D x (top_k * F), GeLU, biases."""
    torch.manual_seed(SEED)
    hidden = shape.top_k * shape.expert_dim
    return nn.Sequential(nn.Linear(shape.model_dim, hidden), nn.GELU(), nn.Linear(hidden, shape.model_dim)).eval()


def decode_row(name: str, static: MoELayer, x: Tensor, ms: dict[str, float], graph: tuple, ctx: Context) -> dict:
    """One layer at one decode size: its times, the dense FFN's, and the graph's check."""
    _, got, status = graph
    mine = {kind: ms[f"{name} {kind}"] for kind in ("eager", "eager static", "CUDA graph") if f"{name} {kind}" in ms}
    kept_TE = static.route(x).kept_TE
    row = {"tokens": x.shape[0], "layer": name, "experts_per_token": kept_TE.sum().item() / x.shape[0],
           "static_rows": static.router.max_pairs(x.shape[0]), "ms": mine,
           "dense_ms": {kind: ms[f"dense {kind}"] for kind in ("eager", "CUDA graph") if f"dense {kind}" in ms}}
    row["eager_vs_dense"] = mine["eager"] / row["dense_ms"]["eager"]
    both = "CUDA graph" in mine and "CUDA graph" in row["dense_ms"]
    row["graph_vs_dense_graph"] = mine["CUDA graph"] / row["dense_ms"]["CUDA graph"] if both else None
    return {**row, **graph_verdict(mine, got, [static(x).output], status, ctx)}


# --- torch.compile -------------------------------------------------------------------------------------


def measure_compile(ctx: Context, shape_name: str) -> Iterator[dict]:
    """Static mode compiled with fullgraph=True, dynamic=False at one shape, from a reset cache:
    each shape its own static graph (and under torch 2.11 a recompile limit that is a hard error
    under fullgraph stays out of reach). Compile time is the first call's; peak memory is one call's."""
    torch._dynamo.reset()
    graphs_before = graphs_compiled()
    shape = ctx.shape(shape_name)
    x = ctx.tokens(shape.tokens, shape.model_dim)
    layer = layer_bench.build_layer(shape, "threshold", "auto", TARGET_K, x, SEED, static=True)
    backend = "aot_eager" if ctx.quick else "inductor"
    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)
    x.requires_grad_(True)
    leaves = [x, *layer.parameters()]
    for backward in (False, True):
        calls = {name: step(lambda m=module: m(x).output, leaves, backward)
                 for name, module in (("eager static", layer), ("compiled", compiled))}
        start = time.perf_counter()
        calls["compiled"]()
        ctx.sync()
        first_s = time.perf_counter() - start
        ms = median_ms(calls, ctx)
        yield {"shape": shape.label, "pass": "fwd+bwd" if backward else "fwd", "backend": backend,
               "first_call_s": first_s, "ms": ms, "speedup": ms["eager static"] / ms["compiled"],
               "peak_mb": {name: peak_mb(fn, ctx) for name, fn in calls.items()},
               "graphs": None if graphs_before is None else graphs_compiled() - graphs_before}


def graphs_compiled() -> int | None:
    """Graphs dynamo has compiled in this process (torch's internal counter; None if it moved)."""
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except (AttributeError, KeyError, TypeError):
        return None


# --- training ------------------------------------------------------------------------------------------


def measure_training(ctx: Context) -> Iterator[dict]:
    names = ["debug-dense", "debug-topk", "debug-xmoe"] if ctx.quick else ["gpt2-dense", "gpt2-topk-64x384", "gpt2-xmoe-64x384"]
    steps, batch = (4, 2) if ctx.quick else (40, 8)
    for name in names:
        yield train_speed(name, ctx.device, steps=steps, batch=batch, quick=ctx.quick)


def train_speed(name: str, device: torch.device, *, steps: int, batch: int, quick: bool) -> dict:
    """Steps of AdamW on random tokens under bf16 autocast; tokens/s over the second half."""
    cfg = get_preset(name)
    cfg = dataclasses.replace(cfg, n_layer=4, dropout=0.0) if not quick else cfg
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    L = cfg.block_size
    tokens = torch.randint(cfg.vocab_size, (steps, batch, L + 1), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed_from, experts = steps // 2, []
    for i in range(steps):
        if i == timed_from:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(tokens[i, :, :-1], tokens[i, :, 1:])
            loss = out.loss + (0.01 * out.aux_loss if cfg.moe is not None else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.moe is not None and i >= timed_from:
            experts.append(torch.stack([s.kept_per_token for s in out.stats]))
    sync()
    seconds = time.perf_counter() - start
    tok_per_s = (steps - timed_from) * batch * L / seconds
    parts = flops_breakdown(cfg, context=L)
    fwd_flops = parts.total - parts.experts
    per_token = None
    if cfg.moe is not None:
        per_layer = torch.stack(experts).float().mean(dim=0).tolist()
        fwd_flops += moe_flops_per_token(cfg, per_layer)
        per_token = sum(per_layer) / len(per_layer)
    peak = peak_flops(device)
    return {
        "model": name + ("" if quick else " (4 layers)"),
        "tokens_per_s": tok_per_s,
        "model_tflops": 3 * fwd_flops * tok_per_s / 1e12,
        "mfu": 3 * fwd_flops * tok_per_s / peak if peak else None,
        "experts_per_token": per_token,
    }


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --- tables ---------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value, spec: str) -> str | None:
    """``value`` formatted, or None (a '-' cell) when it was not measured."""
    return None if value is None else format(value, spec)


def _ms_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for r in rows for name in r["ms"]))


def render_correctness(rows: list[dict]) -> str:
    return table(["variant", "precision", "max error", "tolerance", "routing = CPU", "idle grads 0", "ok"],
                 [[r["variant"], r["precision"], _f(r.get("max_error"), ".1e"), _f(r.get("tolerance"), ".0e"),
                   r.get("routing_equals_cpu"), r.get("idle_grads_zero"), r["ok"] if "skipped" not in r else f"skipped: {r['skipped']}"]
                  for r in rows])


def render_syncs(rows: list[dict]) -> str:
    return table(["variant", "forward", "backward", "within budget"],
                 [[r["variant"], r["forward"], r["backward"], r["ok"] if "skipped" not in r else f"skipped: {r['skipped']}"]
                  for r in rows]) + "\n\nBudget: one per forward, none per backward; none at all in static mode."


def render_triton_times(rows: list[dict]) -> str:
    names = _ms_names(rows)
    return table(["shape", "pass", *(f"{n} ms" for n in names), "triton / best other"],
                 [[r["shape"], r["pass"], *(_f(r["ms"].get(n), ".2f") for n in names),
                   _f(r["triton_vs_best_other"], ".2f")] for r in rows])


def render_graphs(rows: list[dict]) -> str:
    names = _ms_names(rows)
    return table(["tokens", "pass", "kept pairs", "static rows", *(f"{n} ms" for n in names),
                  "graph speed-up vs eager static", "vs eager", "graph error", "graph"],
                 [[r["tokens"], r["pass"], r["kept_pairs"], r["static_rows"], *(_f(r["ms"].get(n), ".3f") for n in names),
                   _f(r.get("graph_vs_eager_static"), ".2f"), _f(r.get("graph_vs_eager"), ".2f"),
                   _f(r["graph_error"], ".1e"), r["graph"]] for r in rows]) + (
        "\n\nstatic rows: what static mode pads the kept pairs to (E x C, or T x E when smaller); "
        "eager: the default backend with its one host sync per call.")


def render_decode(rows: list[dict]) -> str:
    names = ("eager", "eager static", "CUDA graph")
    return table(["tokens", "layer", "experts/token", "static rows", *(f"{n} ms" for n in names), "dense eager ms",
                  "dense graph ms", "eager / dense eager", "graph / dense graph", "graph error", "graph"],
                 [[r["tokens"], r["layer"], f"{r['experts_per_token']:.2f}", r["static_rows"],
                   *(_f(r["ms"].get(n), ".3f") for n in names), _f(r["dense_ms"]["eager"], ".3f"),
                   _f(r["dense_ms"].get("CUDA graph"), ".3f"), f"{r['eager_vs_dense']:.2f}",
                   _f(r["graph_vs_dense_graph"], ".2f"), _f(r["graph_error"], ".1e"), r["graph"]] for r in rows]) + (
        "\n\ndense: one FFN of top-8's FLOPs and weights (xmoe.bench.decode). A layer's graph replays static "
        "mode, which pads its pairs to `static rows` (the rows past the kept pairs are not computed); threshold "
        "routers take at most top-k experts per token in every column, the bound static mode needs.")


def render_compile(rows: list[dict]) -> str:
    return table(["shape", "pass", "backend", "first call s", "eager static ms", "compiled ms", "speed-up",
                  "peak MB eager", "peak MB compiled", "graphs"],
                 [[r["shape"], r["pass"], r["backend"], f"{r['first_call_s']:.1f}", f"{r['ms']['eager static']:.2f}",
                   f"{r['ms']['compiled']:.2f}", f"{r['speedup']:.2f}", _f(r["peak_mb"]["eager static"], ".0f"),
                   _f(r["peak_mb"]["compiled"], ".0f"), r["graphs"]] for r in rows])


def render_training(rows: list[dict]) -> str:
    return ("At initialisation the router is near uniform: the threshold rule wants most experts and "
            "training capacity (factor 8) keeps about 8 per token, as many as top-8.\n\n"
            + table(["model", "tokens/s", "model TFLOP/s", "MFU", "experts/token"],
                    [[r["model"], f"{r['tokens_per_s']:.0f}", f"{r['model_tflops']:.1f}", _f(r["mfu"], ".2f"),
                      _f(r["experts_per_token"], ".2f")] for r in rows]))


# --- the sections, in order of value ----------------------------------------------------------------------


def _layer_section(shape: str, h100_s: float) -> Section:
    return Section(f"layer-{shape}", f"bf16 layer times at {shape} (xmoe.bench.layer)", h100_s,
                   lambda ctx: measure_layer(ctx, shape), render_layer)


def _compile_section(shape: str, h100_s: float) -> Section:
    return Section(f"compile-{shape}", f"static mode under torch.compile(fullgraph=True) at {shape}", h100_s,
                   lambda ctx: measure_compile(ctx, shape), render_compile)


SECTIONS = [
    Section("triton-correctness", "Triton backend: correctness against float64", 30,
            lambda ctx: measure_correctness(ctx, TRITON_VARIANTS), render_correctness, checks=True, child=True),
    Section("triton-syncs", "Triton backend: host syncs", 5,
            lambda ctx: measure_syncs(ctx, TRITON_VARIANTS, triton_shape(ctx, "small")), render_syncs, checks=True, child=True),
    Section("triton-times", "Triton backend: bf16 times at S1", 10, measure_triton_times, render_triton_times,
            child=True),
    Section("correctness", "correctness against float64", 15, measure_correctness, render_correctness, checks=True),
    Section("syncs", "host syncs (torch.cuda.set_sync_debug_mode)", 5, measure_syncs, render_syncs, checks=True),
    _layer_section("S1", 15),
    Section("graphs", "static mode in a CUDA graph against eager, decode sizes and S1", 20, measure_graphs,
            render_graphs, checks=True),
    Section("decode", "decoding: eager and CUDA graphs against the dense FFN (issue 22)", 20, measure_decode,
            render_decode, checks=True),
    _layer_section("paper", 15),
    _compile_section("S1", 60),
    _compile_section("paper", 60),
    Section("training", "bf16 training, 4 layers, random tokens", 45, measure_training, render_training),
    _layer_section("small", 10),
    _layer_section("large", 15),
]
BY_NAME = {s.name: s for s in SECTIONS}
DEFAULT_BUDGET_S = 450  # fits `timeout 560` (10-minute command) with start-up and a margin


# --- the record: results.json and results.md ---------------------------------------------------------------


class Report:
    """results.json and results.md in ``out``, both replaced atomically whenever a row or a
    section's status changes, so whatever stops the run leaves every finished row on disk."""

    def __init__(self, out: Path, header: dict, sections: dict[str, Section]) -> None:
        self.out, self.sections = out, sections
        self.data = {**header, "sections": {}, "ok": True, "finished": False}
        out.mkdir(parents=True, exist_ok=True)

    @property
    def records(self) -> dict[str, dict]:
        return self.data["sections"]

    def start(self, section: Section, status: str = "running") -> None:
        self.records[section.name] = {"title": section.title, "status": status, "seconds": None,
                                      "predicted_h100_s": section.h100_s, "rows": [], "error": None}
        self.flush()

    def add(self, name: str, row: dict) -> None:
        self.records[name]["rows"].append(row)
        self.flush()

    def end(self, name: str, status: str, seconds: float | None, error: str | None = None) -> None:
        self.records[name].update(status=status, seconds=seconds, error=error)
        self.flush()

    def merge(self, records: dict[str, dict]) -> None:
        self.records.update(records)
        self.flush()

    def finish(self, killed: bool = False) -> None:
        self.data.update(finished=not killed, killed=killed)
        self.flush()

    def flush(self) -> None:
        self.data["ok"] = run_ok(self.records, self.sections) and not self.data.get("killed")
        _write(self.out / "results.json", json.dumps(self.data, indent=2, default=str))
        _write(self.out / "results.md", self.markdown())

    def markdown(self) -> str:
        machine = self.data.get("machine", {})
        lines = [f"# xmoe GPU check on {machine.get('device', '?')}", "",
                 f"`{json.dumps(machine)}`, quick={self.data.get('quick')}, budget {self.data.get('budget_s')} s", ""]
        for i, (name, record) in enumerate(self.records.items(), 1):
            lines += [f"## {i}. {record['title']} [{name}]", "", section_status(record), ""]
            if record["rows"]:
                lines += [self.sections[name].render(record["rows"]), ""]
            if record["error"]:
                lines += ["```", record["error"].rstrip(), "```", ""]
        lines.append(summary(self.data, self.sections))
        return "\n".join(lines) + "\n"

    def section_markdown(self, name: str) -> str:
        record = self.records[name]
        rows = self.sections[name].render(record["rows"]) if record["rows"] else ""
        return "\n".join(filter(None, [section_status(record), rows, record["error"]]))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def section_status(record: dict) -> str:
    seconds = "" if record["seconds"] is None else f" in {record['seconds']:.1f} s"
    return f"**{record['status']}**{seconds} (predicted on an H100: {record['predicted_h100_s']:.0f} s)"


FAILED = ("failed", "timeout", "crashed", "killed")


def run_ok(records: dict[str, dict], sections: dict[str, Section]) -> bool:
    """No section failed, and every check row passed (a row not checked here, ok None, passes)."""
    return all(r["status"] not in FAILED for r in records.values()) and all(
        row.get("ok") is not False for name, r in records.items() if sections[name].checks for row in r["rows"])


def summary(data: dict, sections: dict[str, Section]) -> str:
    by_status: dict[str, list[str]] = {}
    for name, record in data["sections"].items():
        by_status.setdefault(record["status"], []).append(name)
    not_started = [name for name in sections if name not in data["sections"]]
    state = "finished" if data["finished"] else ("KILLED" if data.get("killed") else "still running (or stopped)")
    if data.get("killed"):
        verdict = "NOT OK (killed before the end)"
    else:
        verdict = ("every check passed" + ("" if data["finished"] else " so far")) if data["ok"] else (
            "NOT OK (a check failed or a section did not finish)")
    parts = [f"{status}: {', '.join(names)}" for status, names in by_status.items()]
    if not_started:
        parts.append(f"not started: {', '.join(not_started)}")
    return f"**Run {state}; {verdict}.** " + "; ".join(parts)


# --- the run ---------------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def run_sections(sections: list[Section], ctx: Context, report: Report, budget: Budget, in_child: bool) -> None:
    """Each section in order; consecutive child sections together in one child process; after a
    failure that leaves the device unusable, everything left in a fresh child process."""
    i = 0
    while i < len(sections):
        if sections[i].child and not in_child:
            group = list(itertools.takewhile(lambda s: s.child, sections[i:]))
            run_child(group, ctx, report, budget)
            i += len(group)
            continue
        error = run_section(sections[i], ctx, report, budget)
        i += 1
        if error is not None and i < len(sections) and not device_usable(ctx, error):
            print(f"# the device is unusable after {sections[i - 1].name}: the rest runs in a fresh process", flush=True)
            run_child(sections[i:], ctx, report, budget)
            return


def run_section(section: Section, ctx: Context, report: Report, budget: Budget) -> BaseException | None:
    """Runs one section under its time limit, recording its rows as they come and how it ended;
    returns the exception that ended it, if any. SIGTERM is recorded, then passed on."""
    predicted = section.h100_s if ctx.cuda and not ctx.quick else None
    left = budget.left()
    report.start(section)
    if left <= 0 or (predicted is not None and predicted > left):
        report.end(section.name, "skipped", None, f"not enough budget: needs about {predicted or 0:.0f} s, {left:.0f} s left")
        print(f"## {section.name}: skipped (budget)", flush=True)
        return None
    limit = left if predicted is None else min(left, section.cap_s)
    print(f"## {section.title} [{section.name}] (at most {limit:.0f} s)", flush=True)
    start, status, error, raised = time.monotonic(), "ok", None, None
    try:
        with time_limit(limit):
            for row in with_fault(section.measure(ctx), ctx.faults.get(section.name)):
                report.add(section.name, row)
    except Skip as e:
        status, error = "skipped", str(e)
    except SectionTimeout:
        status, error, raised = "timeout", f"stopped at its time limit ({limit:.0f} s)", SectionTimeout()
    except Terminated:
        status, error = "killed", "SIGTERM (the command's timeout) during this section"
        raise
    except Exception as e:  # noqa: BLE001 - any fault of a section is recorded, and the run goes on
        status, error, raised = "failed", traceback.format_exc(), e
    finally:
        report.end(section.name, status, time.monotonic() - start, error)
        print(report.section_markdown(section.name), flush=True)
        _tidy(ctx)
    return raised


def _tidy(ctx: Context) -> None:
    """Frees what a section left behind (a failed one may hold big tensors in its traceback)."""
    gc.collect()
    if ctx.cuda:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises SectionTimeout in the main thread after ``seconds`` (at the next Python bytecode:
    a kernel already queued finishes first)."""

    def expire(signum, frame):
        raise SectionTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def with_fault(rows: Iterator[dict], kind: str | None) -> Iterator[dict]:
    """The section's rows, with the injected fault ``kind`` after the first one (if any)."""
    if kind is None:
        yield from rows
        return
    first = next(rows, None)
    if first is not None:
        yield first
    if kind == "crash":
        os.abort()  # dies as a segfault or a CUDA abort would: no handler, no flush
    if kind == "hang":
        while True:
            time.sleep(1)
    raise (InjectedPoison if kind == "poison" else InjectedFault)(f"injected fault ({kind})")


def device_usable(ctx: Context, error: BaseException) -> bool:
    """Whether the device still computes after ``error`` (a Triton fault poisons a CUDA context)."""
    if isinstance(error, InjectedPoison):
        return False
    if not ctx.cuda:
        return True
    try:
        return float(torch.ones(1, device=ctx.device).add(1).sum().item()) == 2.0
    except Exception:  # noqa: BLE001 - any error here means unusable
        return False


def run_child(sections: list[Section], ctx: Context, report: Report, budget: Budget) -> None:
    """``sections`` in a child process with its own CUDA context and the budget left; merges
    what it recorded (even when it crashed) and records the sections it never finished."""
    names = [s.name for s in sections]
    out = report.out / f"child-{names[0]}"
    limit = min(budget.left(), sum(s.cap_s for s in sections) + 30) if ctx.cuda and not ctx.quick else budget.left()
    for s in sections:
        report.start(s, status="running in a child process")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out), "--device", str(ctx.device),
           "--budget-s", f"{max(limit, 0):.0f}", "--sections", *names, *(["--quick"] if ctx.quick else []),
           *(f"--inject-fault={name}:{kind}" for name, kind in ctx.faults.items() if name in names)]
    env = dict(os.environ)
    if not ctx.cuda:
        env.setdefault("TRITON_INTERPRET", "1")  # the dry run: the Triton kernels run in Triton's interpreter
    print(f"# child process for {', '.join(names)} (at most {limit:.0f} s)", flush=True)
    returncode = None
    try:
        returncode = wait_for_child(subprocess.Popen(cmd, env=env), max(limit, 1) + 15)
    finally:
        report.merge(child_records(out, names, returncode))


def wait_for_child(child: subprocess.Popen, limit: float) -> int | str:
    """The child's exit status; killed past ``limit``. On SIGTERM the child gets SIGTERM too and
    a few seconds to record which section it was in, then the parent goes on stopping."""
    try:
        return child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return "killed at its time limit"
    except Terminated:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        if child.poll() is None:
            child.kill()
        raise


def child_records(out: Path, names: list[str], returncode) -> dict[str, dict]:
    """What the child wrote for ``names``: a section it left running 'crashed', one it never
    reached 'not run'."""
    try:
        written = json.loads((out / "results.json").read_text())["sections"]
    except (OSError, ValueError, KeyError):
        written = {}
    records = {}
    for name in names:
        ended = f"the child process ended ({_exit_reason(returncode)})"
        if name not in written:
            record = {"title": BY_NAME[name].title, "status": "not run", "seconds": None, "rows": [],
                      "predicted_h100_s": BY_NAME[name].h100_s, "error": f"{ended} before it"}
        elif written[name]["status"].startswith("running"):
            record = {**written[name], "status": "crashed", "error": f"{ended} during this section"}
        else:
            record = written[name]
        records[name] = record
    return records


def _exit_reason(returncode) -> str:
    if returncode is None:
        return "stopped with this run"
    if isinstance(returncode, int) and returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = f"{torch.cuda.get_device_name(device)} (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def plan() -> str:
    """The sections in order with their predicted H100 times and caps: the README's table."""
    rows, total = [], 0.0
    for i, s in enumerate(SECTIONS, 1):
        total += s.h100_s
        rows.append([i, s.name, f"{s.h100_s:.0f}", f"{total:.0f}", f"{s.cap_s:.0f}", "child" if s.child else "main"])
    return table(["#", "section", "predicted H100 s", "cumulative s", "cap s", "process"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for results.json and results.md (written as the run goes)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a few steps: a dry run in seconds")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the sections may take in all (default {DEFAULT_BUDGET_S}: a 10-minute command)")
    parser.add_argument("--sections", nargs="+", choices=list(BY_NAME), default=None, help="only these sections")
    parser.add_argument("--inject-fault", action="append", default=[], metavar="SECTION[:KIND]",
                        help="fail SECTION after its first row; KIND: error (default), poison (the device is "
                             "then treated as unusable), crash (abort the process), hang")
    parser.add_argument("--plan", action="store_true", help="print the sections and their predicted H100 times")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run every section in this process
    args = parser.parse_args(argv)
    if not args.plan and not args.out:
        parser.error("--out is required")
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this torch sees no CUDA GPU")
    args.faults = dict(_fault(spec, parser) for spec in args.inject_fault)
    return args


def _fault(spec: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    name, _, kind = spec.partition(":")
    if name not in BY_NAME or (kind or "error") not in ("error", "poison", "crash", "hang"):
        parser.error(f"--inject-fault {spec}: expected SECTION[:error|poison|crash|hang], SECTION one of {', '.join(BY_NAME)}")
    return name, kind or "error"


def main(argv: list[str] | None = None) -> int:
    """Runs the check; returns the exit status (0 all passed, 1 not, 143 killed by SIGTERM)."""
    args = parse_args(argv)
    if args.plan:
        print(plan())
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = Context(device, args.quick, args.faults)
    sections = [s for s in SECTIONS if args.sections is None or s.name in args.sections]
    report = Report(Path(args.out), {"machine": machine(device), "quick": args.quick, "budget_s": args.budget_s},
                    {s.name: s for s in sections})
    print(f"# xmoe GPU check on {report.data['machine']['device']}, budget {args.budget_s:.0f} s", flush=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run_sections(sections, ctx, report, Budget(args.budget_s), in_child=args.child)
    except Terminated:
        report.finish(killed=True)
        return KILLED
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.finish()
    print(summary(report.data, report.sections), flush=True)
    print(f"# wrote {report.out / 'results.json'} and {report.out / 'results.md'}", flush=True)
    return 0 if report.data["ok"] else 1


def _terminate(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
