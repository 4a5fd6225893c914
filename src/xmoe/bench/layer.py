"""Layer benchmark: does XMoE turn saved FLOPs into saved seconds?

Times one MoE layer, forward and forward+backward, against baselines measured in the same
process, interleaved, and prints ratios (these machines are noisy; an absolute time means
little):

    speed limit   one dense GEMM chain doing exactly the kept pairs' FLOPs ([N, D] rows through
                  one expert-sized MLP): what a perfect sparse kernel could reach
    expert GEMMs  the same rows, split as the router split them, each part through its own
                  expert's weights: what any implementation with one GEMM chain per expert pays
                  before routing, gather and combine
    C slots       the authors' scheme: every expert computes all C = gamma*S/E capacity slots
                  (re-implemented from docs/method.md, with index dispatch instead of the
                  reference's one-hot einsums, which only make it slower)
    mask loop     a Python loop over all experts with boolean masks, the common Hugging Face
                  style (nn.Linear per expert, torch.where per expert)
    top-k         our own layer with the same experts and a top-k router (k = 8 at 64 x 384)

The router weights are scaled so that the threshold router engages 2-4 experts per token, as a
trained router does (an untrained one is near uniform and engages most experts).

Shapes: T tokens, D model dim, F expert dim, E experts, C slots, N kept pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.moe import BACKENDS, MoEConfig, MoELayer, auto_backend, capacity


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    model_dim: int
    expert_dim: int
    num_experts: int
    top_k: int  # the top-k baseline's k (8 at 64 x 384: the FLOPs of one dense 3072 FFN)

    @property
    def label(self) -> str:
        return f"{self.name} T={self.tokens} D={self.model_dim} F={self.expert_dim} E={self.num_experts}"


Candidate = tuple[Callable[[], Tensor | list[Tensor]], list[Tensor]]  # what to time, and its gradient leaves

SHAPES = {
    "small": Shape("small", 1024, 256, 128, 32, 8),
    "S1": Shape("S1", 4096, 768, 384, 64, 8),
    "large": Shape("large", 8192, 1024, 512, 64, 8),
    "paper": Shape("paper", 16384, 768, 384, 64, 8),  # GPT-2 small's MoE layer, 16 x 1024 tokens
    "tiny": Shape("tiny", 256, 64, 32, 8, 2),  # dry runs of the scripts
}
FULL = ("small", "S1", "large")


def build_layer(shape: Shape, router: str, backend: str, target_k: float, x: Tensor, seed: int,
                static: bool = False) -> MoELayer:
    """An MoE layer whose (threshold) router engages about ``target_k`` experts per token on x.
    ``static``: static mode (no host sync), padded to the capacity bound E * C."""
    torch.manual_seed(seed)
    cfg = MoEConfig(
        model_dim=shape.model_dim, num_experts=shape.num_experts, expert_dim=shape.expert_dim,
        router=router, threshold=0.9, top_k=shape.top_k, capacity_factor=8.0, backend=backend,
        eval_capacity_factor=8.0 if static else None, static_shapes=static,
    )
    layer = MoELayer(cfg).to(device=x.device, dtype=x.dtype)
    if router == "threshold":
        calibrate_router(layer, x, target_k)
    return layer


@torch.no_grad()
def calibrate_router(layer: MoELayer, x: Tensor, target_k: float) -> None:
    """Scale the router weights (bisection on log scale) until mean wanted experts ~ target_k."""
    base = layer.router.weight.detach().clone()
    lo, hi = 0.0, 8.0  # log2 of the scale
    for _ in range(30):
        mid = (lo + hi) / 2
        layer.router.weight.copy_(base * 2**mid)
        k = layer.route(x).wanted_TE.sum(-1).float().mean().item()
        lo, hi = (mid, hi) if k > target_k else (lo, mid)
    layer.router.weight.copy_(base * 2**hi)


def speed_limit(layer: MoELayer, num_pairs: int, x: Tensor) -> Candidate:
    """One dense GEMM chain over N rows with one expert's weights: the kept pairs' FLOPs."""
    rows = x.new_empty(num_pairs, x.shape[1]).normal_().requires_grad_(x.requires_grad)
    w1 = layer.experts.w1[0].detach().clone().requires_grad_(True)
    b1 = layer.experts.b1[0].detach().clone().requires_grad_(True)
    w2 = layer.experts.w2[0].detach().clone().requires_grad_(True)
    b2 = layer.experts.b2[0].detach().clone().requires_grad_(True)
    return (lambda: torch.addmm(b2, F.gelu(torch.addmm(b1, rows, w1)), w2)), [rows, w1, b1, w2, b2]


def expert_gemms(layer: MoELayer, counts: list[int], x: Tensor) -> Candidate:
    """The kept pairs' rows through their own experts, one GEMM chain per expert, and nothing
    else: no routing, no gather, no combine. Each expert's rows and weights are separate leaves
    (slices of shared leaves would give every expert a full-size gradient to add)."""
    ex = layer.experts
    leaf = lambda t: t.detach().clone().requires_grad_(x.requires_grad)
    parts = [(leaf(x.new_empty(n, x.shape[1]).normal_()), *(leaf(p[e]) for p in (ex.w1, ex.b1, ex.w2, ex.b2)))
             for e, n in enumerate(counts) if n]
    run = lambda: [torch.addmm(b2, F.gelu(torch.addmm(b1, rows, w1)), w2) for rows, w1, b1, w2, b2 in parts]
    return run, [t for part in parts for t in part]


def capacity_slots(layer: MoELayer, x: Tensor) -> Candidate:
    """The authors' scheme: route as XMoE, then every expert computes all C slots ([E, C, D])."""
    E = layer.cfg.num_experts
    ex = layer.experts

    def run() -> Tensor:
        decision = layer.router(x)
        T, D = x.shape
        slots = decision.capacity
        kept_ET = decision.kept_TE.T
        position_ET = kept_ET.long().cumsum(dim=1) - 1  # slot of each kept token in its expert
        e_idx, t_idx = kept_ET.nonzero(as_tuple=True)
        slot_idx = position_ET[e_idx, t_idx]
        buffer_ECD = x.new_zeros(E, slots, D)
        buffer_ECD[e_idx, slot_idx] = x[t_idx]
        h_ECF = F.gelu(torch.baddbmm(ex.b1.unsqueeze(1), buffer_ECD, ex.w1))
        y_ECD = torch.baddbmm(ex.b2.unsqueeze(1), h_ECF, ex.w2)
        weights = decision.weights_TE[t_idx, e_idx].unsqueeze(-1).to(x.dtype)
        return x.new_zeros(T, D).index_add(0, t_idx, y_ECD[e_idx, slot_idx] * weights)

    return run, [x, *layer.parameters()]


def mask_loop(layer: MoELayer, x: Tensor) -> Candidate:
    """Hugging Face style: nn.Linear experts, a loop over all of them, torch.where per expert."""
    ex = layer.experts
    ups, downs = nn.ModuleList(), nn.ModuleList()
    for e in range(layer.cfg.num_experts):
        up = nn.Linear(ex.w1.shape[1], ex.w1.shape[2]).to(x.device, x.dtype)
        down = nn.Linear(ex.w2.shape[1], ex.w2.shape[2]).to(x.device, x.dtype)
        with torch.no_grad():
            up.weight.copy_(ex.w1[e].T), up.bias.copy_(ex.b1[e])
            down.weight.copy_(ex.w2[e].T), down.bias.copy_(ex.b2[e])
        ups.append(up), downs.append(down)

    def run() -> Tensor:
        decision = layer.router(x)
        out = torch.zeros_like(x)
        for e in range(len(ups)):
            (tokens,) = torch.where(decision.kept_TE[:, e])
            y = downs[e](F.gelu(ups[e](x[tokens]))) * decision.weights_TE[tokens, e, None].to(x.dtype)
            out = out.index_add(0, tokens, y)
        return out

    return run, [x, *layer.router.parameters(), *ups.parameters(), *downs.parameters()]


def timed(fn: Callable[[], Tensor], backward: bool, sync: Callable[[], None], leaves: list[Tensor]) -> float:
    for leaf in leaves:  # as optimizer.zero_grad() does: fresh gradients, no accumulation
        leaf.grad = None
    start = time.perf_counter()
    if backward:
        outs = fn()
        outs = outs if isinstance(outs, list) else [outs]
        # A real (not expanded) gradient, as a loss would give.
        torch.autograd.backward(outs, [torch.ones_like(out) for out in outs])
    else:
        with torch.no_grad():
            fn()
    sync()
    return time.perf_counter() - start


def runnable_backends(shape: Shape, x: Tensor) -> list[str]:
    """The backends that can run this shape on x here (the Triton kernel needs a GPU, ...)."""
    probe = MoELayer(MoEConfig(model_dim=shape.model_dim, num_experts=1, expert_dim=shape.expert_dim)).experts
    return [name for name, b in BACKENDS.items() if b.problem(probe, x) is None]


def make_candidates(shape: Shape, x: Tensor, *, target_k: float, seed: int, backends: list[str],
                    static: bool = True, compile_backend: str | None = None) -> tuple[dict[str, Candidate], MoELayer]:
    """Everything the benchmark times on input ``x`` (which needs grad for fwd+bwd), sharing one
    set of weights, and the reference layer those weights come from. ``static``: also the layer
    in static mode (backend auto); ``compile_backend``: also that layer under
    ``torch.compile(fullgraph=True, backend=compile_backend)``."""
    layers = {b: build_layer(shape, "threshold", b, target_k, x.detach(), seed) for b in backends}
    if static or compile_backend:
        layers["static"] = build_layer(shape, "threshold", "auto", target_k, x.detach(), seed, static=True)
    ref = layers[backends[0]]
    for layer in layers.values():  # same weights for every backend
        layer.load_state_dict(ref.state_dict())
    topk = build_layer(shape, "topk", "auto", target_k, x.detach(), seed)
    topk.experts.load_state_dict(ref.experts.state_dict())
    topk.router.weight.data.copy_(ref.router.weight)
    with torch.no_grad():
        counts = ref(x).stats.tokens_per_expert.tolist()

    candidates: dict[str, Candidate] = {
        f"xmoe[{b}]": ((lambda l=l: l(x).output), [x, *l.parameters()]) for b, l in layers.items()
    }
    if compile_backend:
        compiled = torch.compile(layers["static"], fullgraph=True, backend=compile_backend)
        candidates["xmoe[static, compiled]"] = ((lambda: compiled(x).output), [x, *layers["static"].parameters()])
        if not static:
            del candidates["xmoe[static]"]
    candidates.update({
        "speed limit": speed_limit(ref, sum(counts), x),
        "expert GEMMs": expert_gemms(ref, counts, x),
        "C slots": capacity_slots(ref, x),
        "mask loop": mask_loop(ref, x),
        f"top-{shape.top_k}": ((lambda: topk(x).output), [x, *topk.parameters()]),
    })
    return candidates, ref


def bench_shape(shape: Shape, *, device: torch.device, dtype: torch.dtype, target_k: float,
                repeats: int, seed: int, backends: list[str], static: bool = True,
                compile_backend: str | None = None) -> list[dict]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.tokens, shape.model_dim, generator=gen).to(device=device, dtype=dtype)
    candidates, ref = make_candidates(shape, x.requires_grad_(True), target_k=target_k, seed=seed,
                                      backends=backends, static=static, compile_backend=compile_backend)
    with torch.no_grad():
        stats = ref(x).stats
    slots = capacity(shape.tokens, shape.num_experts, 8.0, 4)

    rows = []
    for backward in (False, True):
        print(f"#   {'fwd+bwd' if backward else 'fwd'}: {repeats} rounds of {len(candidates)} candidates",
              file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for fn, leaves in candidates.values():  # warm-up
            timed(fn, backward, sync, leaves)
        for _ in range(repeats):  # interleaved, so drift hits every candidate alike
            for name, (fn, leaves) in candidates.items():
                times[name].append(timed(fn, backward, sync, leaves))
        med = {name: statistics.median(t) for name, t in times.items()}
        best = min((n for n in med if n.startswith("xmoe[")), key=med.get)
        rows.append({
            "shape": shape.label, "pass": "fwd+bwd" if backward else "fwd",
            "experts_per_token": stats.kept_per_token.item(), "capacity": slots,
            "ms": {n: 1e3 * t for n, t in med.items()},
            "best_backend": best[5:-1],
            "speed_limit_fraction": med["speed limit"] / med[best],
            "expert_gemms_fraction": med["expert GEMMs"] / med[best],
            "speedup_vs_C_slots": med["C slots"] / med[best],
            "speedup_vs_mask_loop": med["mask loop"] / med[best],
            "time_vs_topk": med[best] / med[f"top-{shape.top_k}"],
            "auto_backend": auto_backend(ref.experts, x),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    names = list(rows[0]["ms"])
    print("| shape | pass | experts/token | " + " | ".join(f"{n} ms" for n in names)
          + " | best | speed-limit fraction | expert-GEMM fraction | vs C slots | vs mask loop | time / top-k |")
    print("|" + "---|" * (len(names) + 9))
    for r in rows:
        print(f"| {r['shape']} | {r['pass']} | {r['experts_per_token']:.2f} | "
              + " | ".join(f"{r['ms'][n]:.1f}" for n in names)
              + f" | {r['best_backend']} | {r['speed_limit_fraction']:.2f} | {r['expert_gemms_fraction']:.2f}"
              f" | {r['speedup_vs_C_slots']:.1f}x"
              f" | {r['speedup_vs_mask_loop']:.1f}x | {r['time_vs_topk']:.2f} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: small and S1 (about a minute on a laptop CPU); --full: all")
    parser.add_argument("--full", action="store_true", help="every shape (small, S1, large), 7 repeats")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--target-k", type=float, default=3.0, help="mean experts per token to calibrate the router to")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3, or 7 with --full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=None, choices=list(BACKENDS),
                        help="default: every backend that runs on this device")
    parser.add_argument("--no-static", action="store_true", help="leave out the layer in static mode")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch sees no CUDA GPU; leave --device out to run on the CPU")
    if args.json:  # its folder made now: a path that cannot take the file fails before the timings, not after
        if Path(args.json).is_dir():
            raise UsageError(f"--json {args.json} is a folder; give the name of the file to write the rows to")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = args.shapes or (list(FULL) if args.full else ["small", "S1"])
    repeats = args.repeats if args.repeats is not None else (7 if args.full else 3)
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    fewest = min(SHAPES[name].num_experts for name in shapes)
    if not 1 <= args.target_k <= fewest:  # the bisection would settle at the nearest reachable mean instead
        raise UsageError(f"--target-k must be between 1 and the shapes' experts ({fewest}), got {args.target_k:g}")
    print(f"# xmoe layer benchmark: {device}, {dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeats}, threshold router t=0.9, capacity factor 8")
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        x = torch.zeros(1, shape.model_dim, device=device, dtype=dtype)
        backends = args.backends or runnable_backends(shape, x)
        print(f"# {shape.label}: timing {', '.join(backends)}{'' if args.no_static else ', static'} "
              f"and the baselines ...", file=sys.stderr, flush=True)
        rows += bench_shape(shape, device=device, dtype=dtype, target_k=args.target_k,
                            repeats=repeats, seed=args.seed, backends=backends, static=not args.no_static)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
