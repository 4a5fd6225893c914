"""Decode benchmark: what a call of a few tokens costs, against the floor of reading its weights.

XMoE's threshold is an inference compute dial: fewer experts per token should mean less time
per token, at decode too, where a call holds a few tokens and reading the weights is the cost.
Everything is timed in one process, candidates interleaved, medians; ratios are the result
(absolute times on a shared machine swing several-fold).

Per layer, eval mode, no grad, T tokens per call:

    dense         one FFN D x (top_k * F): the FLOPs and weight bytes of a top-8 token
    top-8/2/1     the MoE layer with a top-k router
    xmoe-sharp    the threshold router, scaled to engage about 1.2 experts per token (a sharpened
                  router, docs/results.md)
    xmoe-soft     the same, about 3 experts per token (the paper's recipe, unsharpened)

each next to its **active-weights floor**: a plain GEMM chain over exactly the experts its
router kept for these tokens, each expert once, on its own tokens (weights pre-split, rows
pre-gathered: the matmuls and activations and nothing else). ``/ floor`` is the layer's time
over that floor; ``/ dense`` its time over the dense FFN's. The floor leaves the routing out.
``floor + gate`` adds the least a router can cost in front of it, in the same call: the gate's
GEMM, the softmax and one read of the probabilities (nothing decided, nothing checked). Run
right after the weights of the previous call, as a layer's gate runs, it costs several times
what it costs timed alone in a loop. ``/ (floor + gate)`` is what the layer adds to the work a
routed layer cannot skip.

End to end: ``GPT.generate`` at batch 1 (random weights; the MoE models share every weight but
their routers), ms per new token, the speed-up over the dense model, and the speed-up the
weights a token reads allow (dense active weights / MoE active weights, at the experts per
token measured during generation), with the fraction of it reached.

    xmoe bench decode --threads 1                      # GPT-2-small and CPU-preset shapes
    python benchmarks/decode.py --threads 1 --repeats 9

Shapes: T tokens, D model dim, F expert dim, E experts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.bench.layer import calibrate_router
from xmoe.errors import UsageError
from xmoe.moe import MoEConfig, MoELayer


@dataclass(frozen=True)
class DecodeShape:
    name: str
    preset: str  # the GPT preset size of the end-to-end run (xmoe.presets.gpt.SIZES)
    model_dim: int
    num_experts: int
    expert_dim: int
    top_k: int  # the parameter-matched top-k (one dense FFN's FLOPs): 8 at 64 x (d_ff / 8)


SHAPES = {
    "gpt2": DecodeShape("gpt2", "gpt2", 768, 64, 384, 8),
    "cpu": DecodeShape("cpu", "cpu", 256, 64, 128, 8),
    "tiny": DecodeShape("tiny", "debug", 64, 16, 128, 2),  # dry runs (the debug preset)
}
TOKENS = (1, 4, 16, 64)
# (name, router, k or target experts per token)
ROUTERS = (("top-8", "topk", 8), ("top-2", "topk", 2), ("top-1", "topk", 1),
           ("xmoe-sharp", "threshold", 1.2), ("xmoe-soft", "threshold", 3.0))
CALIBRATION_TOKENS = 512


# --- timing ----------------------------------------------------------------------------------


def clock() -> Callable[[], float]:
    """The CPU time of this thread when torch runs on it alone (one thread): on a machine shared
    with other jobs it leaves out the time the scheduler gives them; else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, sample_s: float = 0.01) -> dict[str, float]:
    """Median seconds per call of each candidate: ``repeats`` rounds, each timing every candidate
    once (over enough calls to last about ``sample_s``), so drift hits all alike.

    Each round runs the candidates in a new order (shuffled, seeded): a candidate's time depends
    on what ran just before it (measured: a layer right after the dense FFN's 9 MB of weights ran
    ~30% slower for its whole sample), so none keeps the same predecessor. (Rounds that only
    started one candidate later kept it in all rounds but one in every len(candidates).)"""
    now, calls = clock(), {}
    for name, fn in candidates.items():
        fn()  # warm-up
        start = now()
        fn()
        calls[name] = max(1, round(sample_s / max(now() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order, rng = list(candidates.items()), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name, fn in order:
            start = now()
            for _ in range(calls[name]):
                fn()
            times[name].append((now() - start) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


# --- per layer -------------------------------------------------------------------------------


def build_layers(shape: DecodeShape, seed: int) -> dict[str, MoELayer]:
    """One eval-mode layer per router of ROUTERS, all sharing one set of experts; threshold
    routers are scaled to their target experts per token on random tokens."""
    calibration = torch.randn(CALIBRATION_TOKENS, shape.model_dim, generator=torch.Generator().manual_seed(seed))
    layers, experts = {}, None
    for name, router, k in ROUTERS:
        torch.manual_seed(seed)
        layer = MoELayer(MoEConfig(model_dim=shape.model_dim, num_experts=shape.num_experts,
                                   expert_dim=shape.expert_dim, router=router, threshold=0.9,
                                   top_k=int(k) if router == "topk" else shape.top_k)).eval()
        experts = experts or layer.experts
        layer.experts = experts
        if router == "threshold":
            calibrate_router(layer, calibration, k)
        layers[name] = layer
    return layers


def dense_ffn(shape: DecodeShape, seed: int) -> Callable[[Tensor], Tensor]:
    """A dense FFN D x (top_k * F), GeLU, biases: the FLOPs and bytes of one top-k token."""
    torch.manual_seed(seed)
    up, down = nn.Linear(shape.model_dim, shape.top_k * shape.expert_dim), nn.Linear(shape.top_k * shape.expert_dim, shape.model_dim)
    return lambda x: down(F.gelu(up(x)))


def active_weights_floor(layer: MoELayer, x_TD: Tensor) -> tuple[Callable[[], None], float]:
    """The floor of ``layer`` on ``x_TD``: each kept expert's GEMM chain on its own tokens, once
    (weights pre-split, rows pre-gathered), and the experts kept per token."""
    kept_TE = layer.route(x_TD).kept_TE
    ex = layer.experts
    parts = []
    for e in kept_TE.any(dim=0).nonzero().flatten().tolist():
        rows = x_TD[kept_TE[:, e]].contiguous()
        parts.append((rows, *(None if p is None else p[e] for p in (ex.w1, ex.b1, ex.w2, ex.b2, ex.w3, ex.b3))))

    def run() -> None:
        for rows, w1, b1, w2, b2, w3, b3 in parts:
            up = torch.addmm(b1, rows, w1) if b1 is not None else rows @ w1
            gate = (torch.addmm(b3, rows, w3) if b3 is not None else rows @ w3) if w3 is not None else None
            hidden = ex.hidden(up, gate)
            torch.addmm(b2, hidden, w2) if b2 is not None else hidden @ w2

    return run, kept_TE.sum(dim=-1).float().mean().item()


def gate_floor(layer: MoELayer, x_TD: Tensor) -> Callable[[], list]:
    """The least routing ``x_TD`` can cost: the gate's GEMM (on a transpose made beforehand), the
    softmax and one read of the probabilities to the host. No rule applied, no check."""
    weight_t = layer.router.weight.detach().t()
    return lambda: torch.mm(x_TD, weight_t).softmax(dim=-1).tolist()


def floor_and_gate(gate: Callable[[], list], floor: Callable[[], None]) -> Callable[[], None]:
    """The gate, then the active-weights floor: the least a routed layer's call can do."""
    def run() -> None:
        gate()
        floor()
    return run


def bench_layer(shape: DecodeShape, tokens: int, layers: dict[str, MoELayer], dense, repeats: int, seed: int) -> list[dict]:
    """One row per router at ``tokens`` tokens per call."""
    x = torch.randn(tokens, shape.model_dim, generator=torch.Generator().manual_seed(seed + tokens))
    candidates: dict[str, Callable[[], object]] = {"dense": lambda: dense(x)}
    experts_per_token = {}
    for name, layer in layers.items():
        candidates[name] = lambda layer=layer: layer(x)
        candidates[f"{name} floor"], experts_per_token[name] = active_weights_floor(layer, x)
        candidates[f"{name} floor + gate"] = floor_and_gate(gate_floor(layer, x), candidates[f"{name} floor"])
    with torch.no_grad():
        med = interleaved(candidates, repeats)
    return [{
        "shape": shape.name, "tokens": tokens, "layer": name, "experts_per_token": experts_per_token[name],
        "ms": 1e3 * med[name], "floor_ms": 1e3 * med[f"{name} floor"], "floor_gate_ms": 1e3 * med[f"{name} floor + gate"],
        "dense_ms": 1e3 * med["dense"], "vs_floor": med[name] / med[f"{name} floor"],
        "vs_floor_gate": med[name] / med[f"{name} floor + gate"], "vs_dense": med[name] / med["dense"],
    } for name in layers]


# --- end to end ------------------------------------------------------------------------------


@dataclass
class ExpertCount:
    """Kept (token, expert) pairs and routed tokens, summed over a model's MoE layer calls."""

    pairs: Tensor | float = 0.0
    tokens: int = 0
    layers: int = 0

    @property
    def experts_per_token(self) -> float:
        """Mean experts a token got, over every MoE layer (nan when nothing was routed)."""
        return float(self.pairs) / self.tokens if self.tokens else float("nan")


@contextlib.contextmanager
def counting_experts(model: nn.Module) -> Iterator[ExpertCount]:
    """Counts the experts every MoE layer of ``model`` keeps while the context is open: xmoe's
    MoELayers, or else the routers of a pretrained MoE family (xmoe.hf.adaptive, adapted or not).
    Two small ops per call, on the device, read once at the end."""
    count = ExpertCount()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if layers:
        def hook(layer: MoELayer, inputs: tuple, out) -> None:
            count.pairs = count.pairs + out.stats.kept_per_token * out.stats.num_tokens
            count.tokens += out.stats.num_tokens
    elif "transformers" in sys.modules:  # a transformers model (xmoe.hf needs the hf extra)
        from xmoe.hf.adaptive import engaged_experts, moe_routers

        layers = moe_routers(model)

        def hook(router: nn.Module, inputs: tuple, outputs: tuple) -> None:
            per_token_T = engaged_experts(outputs)
            count.pairs = count.pairs + per_token_T.sum()
            count.tokens += per_token_T.numel()
    count.layers = len(layers)
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def generation_report(model: nn.Module, new_tokens: int, out=None) -> Iterator[None]:
    """Times the generation inside the context and then prints its speed and the experts a token
    got, one line to ``out`` (stderr), as ``xmoe generate`` does."""
    with counting_experts(model) as count:
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
    line = f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / max(seconds, 1e-9):.1f} tokens/s"
    if count.layers:
        layers = f"{count.layers} MoE layer{'s' if count.layers > 1 else ''}"
        line += f", {count.experts_per_token:.2f} experts per token (mean over {layers})"
    print(line, file=out or sys.stderr)


def active_params(model: nn.Module, experts_per_token: float | None) -> float:
    """Weights one decoded token reads: every parameter but the position embeddings (one row
    read), with each MoE layer's experts at ``experts_per_token`` of E."""
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("wpe."))
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        expert_params = sum(p.numel() for p in layer.experts.parameters())
        total -= expert_params * (1 - experts_per_token / layer.experts.num_experts)
    return total


def build_models(shape: DecodeShape, seed: int) -> dict[str, nn.Module]:
    """The dense preset model, and one MoE model per router of ROUTERS sharing every weight but
    the router (threshold routers scaled as in ``build_layers``)."""
    from xmoe.models import GPT
    from xmoe.presets.gpt import dense, with_moe

    torch.manual_seed(seed)
    models = {"dense": GPT(dense(shape.preset)).eval()}
    base = None
    for name, router, k in ROUTERS:
        cfg = with_moe(shape.preset, router, shape.num_experts)
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, top_k=int(k) if router == "topk" else cfg.moe.top_k))
        model = GPT(cfg).eval()
        if base is None:
            base = model
        else:
            _share_weights(model, base)
        if router == "threshold":
            calibration = torch.randn(CALIBRATION_TOKENS, shape.model_dim, generator=torch.Generator().manual_seed(seed))
            for layer in model.moe_layers():
                calibrate_router(layer, calibration, k)
        models[name] = model
    return models


@torch.no_grad()
def _share_weights(model: nn.Module, base: nn.Module) -> None:
    """Point every parameter of ``model`` at ``base``'s storage, the routers' at copies."""
    for (name, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        p.set_(q.clone() if name.endswith("router.weight") else q)


def bench_generate(shape: DecodeShape, models: dict[str, nn.Module], new_tokens: int, repeats: int) -> list[dict]:
    """ms per new token of ``generate`` (greedy, batch 1, from a 1-token prompt), interleaved."""
    prompt = torch.zeros(1, 1, dtype=torch.long)
    candidates = {name: (lambda m=m: m.generate(prompt, new_tokens, temperature=0)) for name, m in models.items()}
    med = interleaved(candidates, repeats, sample_s=0.0)
    dense_active = active_params(models["dense"], None)
    rows = []
    for name, model in models.items():
        with counting_experts(model) as count:
            model.generate(prompt, new_tokens, temperature=0)
        k = count.experts_per_token if count.layers else None
        allowed = dense_active / active_params(model, k)
        speedup = med["dense"] / med[name]
        rows.append({"shape": shape.name, "model": name, "experts_per_token": k, "ms_per_token": 1e3 * med[name] / new_tokens,
                     "speedup": speedup, "allowed_speedup": allowed, "fraction_of_allowed": speedup / allowed})
    return rows


# --- command ---------------------------------------------------------------------------------


def print_layer_table(rows: list[dict]) -> None:
    print("| shape | T | layer | experts/token | ms | floor ms | floor + gate ms | / floor | / (floor + gate) | / dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['layer']} | {r['experts_per_token']:.2f} | {r['ms']:.3f} | "
              f"{r['floor_ms']:.3f} | {r['floor_gate_ms']:.3f} | {r['vs_floor']:.2f} | {r['vs_floor_gate']:.2f} | "
              f"{r['vs_dense']:.2f} |")


def print_generate_table(rows: list[dict]) -> None:
    print("| shape | model | experts/token | ms/token | speed-up | allowed | reached |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        k = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        print(f"| {r['shape']} | {r['model']} | {k} | {r['ms_per_token']:.2f} | {r['speedup']:.2f} | "
              f"{r['allowed_speedup']:.2f} | {r['fraction_of_allowed']:.2f} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "cpu"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="tokens per layer call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens each end-to-end generate call decodes")
    parser.add_argument("--no-generate", action="store_true", help="per layer only")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    if args.repeats < 1 or min(args.tokens) < 1 or args.new_tokens < 1:
        raise UsageError("--repeats, --tokens and --new-tokens must be positive")
    print(f"# xmoe decode benchmark: cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, interleaved; eval mode, no grad")
    layer_rows, generate_rows = [], []
    for name in args.shapes:
        shape = SHAPES[name]
        print(f"# {name}: layers at T = {args.tokens} ...", file=sys.stderr, flush=True)
        layers, dense = build_layers(shape, args.seed), dense_ffn(shape, args.seed)
        for tokens in args.tokens:
            layer_rows += bench_layer(shape, tokens, layers, dense, args.repeats, args.seed)
        if not args.no_generate:
            print(f"# {name}: generate ...", file=sys.stderr, flush=True)
            generate_rows += bench_generate(shape, build_models(shape, args.seed), args.new_tokens, args.repeats)
    print_layer_table(layer_rows)
    if generate_rows:
        print()
        print_generate_table(generate_rows)
    return {"layer": layer_rows, "generate": generate_rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
