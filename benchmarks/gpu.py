"""The GPU check: everything xmoe claims on a GPU, measured in one run of a few minutes.

    PYTHONPATH=src python benchmarks/gpu.py --out gpu-results          # on one CUDA device
    PYTHONPATH=src python benchmarks/gpu.py --device cpu --quick --out /tmp/dry   # the dry run CI does

Runs on the packages a GPU machine already has (torch with CUDA; Triton if present), installs
nothing and downloads nothing. Writes ``results.json`` and ``results.md`` to ``--out`` and
prints the tables as it goes:

1. correctness: every backend that runs here, and static mode, against a float64 reference
   computed on the CPU from the same weights and the layer's own routing decision (whose
   routing is itself checked against the CPU's), in fp32 and under bf16 autocast: the output
   and every gradient; idle experts' gradients must be exactly zero.
2. host syncs per forward and per backward of each, counted by torch's own detector
   (``torch.cuda.set_sync_debug_mode("warn")``). The budget: one per forward, none per
   backward, none at all in static mode.
3. bf16 layer times at small, S1, large and paper scale (xmoe.bench.layer): the best backend
   against the dense speed limit (one GEMM chain doing the kept pairs' FLOPs), top-8 on the same
   experts, the authors' C-slot scheme, and static mode compiled with fullgraph=True.
4. 40 steps of bf16 training of 4-layer gpt2-dense, gpt2-topk-64x384 and gpt2-xmoe-64x384 on
   random tokens: tokens/s, model FLOPs utilisation and experts per token.

``--quick`` shrinks every part to seconds (tiny shapes, a few steps) for the dry run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xmoe.bench import layer as layer_bench
from xmoe.bench.probes import cuda_syncs
from xmoe.models.gpt import GPT, flops_breakdown, moe_flops_per_token
from xmoe.presets import get_preset
from xmoe.moe import BACKENDS, MoEConfig, MoELayer

# Peak dense bf16 tensor-core FLOP/s, for model FLOPs utilisation (vendor datasheets).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}

CHECK = dict(model_dim=64, num_experts=8, expert_dim=32)  # the correctness layer (grouped_mm-friendly)
PARAMS = ("w1", "b1", "w2", "b2")


# --- 1. correctness ------------------------------------------------------------------------


def variants(device: torch.device) -> list[tuple[str, dict]]:
    """(name, MoEConfig overrides) of everything that can run on ``device``."""
    probe = MoELayer(MoEConfig(**CHECK)).experts
    x = torch.zeros(1, CHECK["model_dim"], device=device)
    out = [(name, dict(backend=name)) for name, b in BACKENDS.items() if b.problem(probe.to(device), x) is None]
    out.append(("static", dict(static_shapes=True, max_experts=4)))
    return out


def check_layer(device: torch.device, overrides: dict, precision: str) -> dict:
    """One variant against the float64 reference; returns the worst errors and the verdicts."""
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
    tolerance = 2e-2 if precision == "bf16" else 1e-4
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


def _rel(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """Largest error relative to the reference's largest magnitude (inf: no gradient at all)."""
    if a is None:
        return float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _cpu_copy(layer: MoELayer) -> MoELayer:
    cpu = MoELayer(dataclasses.replace(layer.cfg, backend="loop", static_shapes=False, check_finite=None))
    cpu.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    return cpu.train(layer.training)


# --- 2. host syncs ---------------------------------------------------------------------------


def count_syncs(device: torch.device, overrides: dict) -> dict:
    """Syncs torch's detector reports in one forward and one backward (after a warm-up), and
    whether they keep the budget: one per forward, none per backward; none in static mode."""
    if device.type != "cuda":
        return {"forward": None, "backward": None, "ok": True}  # the detector exists on CUDA only
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=256, num_experts=32, expert_dim=128, threshold=0.9,
                               capacity_factor=8.0, eval_capacity_factor=8.0, **overrides)).to(device)
    x = torch.randn(1024, 256, device=device, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x).output.float().sum().backward()  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with cuda_syncs() as forward:
            out = layer(x)
        with cuda_syncs() as backward:
            out.output.float().sum().backward()
    counts = {"forward": len(forward), "backward": len(backward)}
    budget = 0 if overrides.get("static_shapes") else 1
    return {**counts, "ok": counts["forward"] <= budget and counts["backward"] == 0}


# --- 4. training -----------------------------------------------------------------------------


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
    for step in range(steps):
        if step == timed_from:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(tokens[step, :, :-1], tokens[step, :, 1:])
            loss = out.loss + (0.01 * out.aux_loss if cfg.moe is not None else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.moe is not None and step >= timed_from:
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


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(device), "quick": args.quick}
    say(f"# xmoe GPU check on {results['machine']['device']}")

    say("## 1. correctness against float64")
    results["correctness"] = [
        {"variant": name, "precision": precision, **check_layer(device, overrides, precision)}
        for name, overrides in variants(device) for precision in ("fp32", "bf16")
    ]
    say(table(["variant", "precision", "max error", "tolerance", "routing = CPU", "idle grads 0", "ok"],
              [[r["variant"], r["precision"], f"{r['max_error']:.1e}", f"{r['tolerance']:.0e}",
                r["routing_equals_cpu"], r["idle_grads_zero"], r["ok"]] for r in results["correctness"]]))

    say("## 2. host syncs (torch.cuda.set_sync_debug_mode)")
    results["syncs"] = [{"variant": name, **count_syncs(device, overrides)} for name, overrides in variants(device)]
    say(table(["variant", "forward", "backward", "within budget"],
              [[r["variant"], r["forward"], r["backward"], r["ok"]] for r in results["syncs"]]))

    say("## 3. bf16 layer times (xmoe.bench.layer)")
    shapes = ["tiny"] if args.quick else ["small", "S1", "large", "paper"]
    rows = []
    for shape in shapes:
        s = layer_bench.SHAPES[shape]
        x = torch.zeros(1, s.model_dim, device=device, dtype=torch.bfloat16)
        say(f"# {s.label}")
        rows += layer_bench.bench_shape(
            s, device=device, dtype=torch.bfloat16, target_k=3.0, repeats=1 if args.quick else 7, seed=0,
            backends=layer_bench.runnable_backends(s, x), static=True,
            compile_backend="aot_eager" if args.quick else "inductor",
        )
    results["layer"] = rows
    layer_bench.print_table(rows)

    say("## 4. bf16 training, 4 layers, random tokens")
    say("At initialisation the router is near uniform: the threshold rule wants most experts and "
        "training capacity (factor 8) keeps about 8 per token, as many as top-8.")
    names = ["debug-dense", "debug-topk", "debug-xmoe"] if args.quick else ["gpt2-dense", "gpt2-topk-64x384", "gpt2-xmoe-64x384"]
    steps, batch = (4, 2) if args.quick else (40, 8)
    results["training"] = [train_speed(n, device, steps=steps, batch=batch, quick=args.quick) for n in names]
    say(table(["model", "tokens/s", "model TFLOP/s", "MFU", "experts/token"],
              [[r["model"], f"{r['tokens_per_s']:.0f}", f"{r['model_tflops']:.1f}",
                f"{r['mfu']:.2f}" if r["mfu"] is not None else "-",
                f"{r['experts_per_token']:.2f}" if r["experts_per_token"] is not None else "-"]
               for r in results["training"]]))

    results["ok"] = all(r["ok"] for r in results["correctness"] + results["syncs"])
    say(f"# correctness and sync budget: {'all met' if results['ok'] else 'NOT MET (see the tables above)'}")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text("\n".join(_LOG) + "\n")
    say(f"# wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return results


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


_LOG: list[str] = []


def say(text: str) -> None:
    _LOG.append(text)
    print(text, flush=True)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a few steps: a dry run in seconds")
    args = parser.parse_args(argv)
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this torch sees no CUDA GPU")
    _LOG.clear()
    return run(args)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)  # timings are reported, not judged; correctness and syncs are
