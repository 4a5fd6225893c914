"""Code the spawned ranks run (gloo on 127.0.0.1). Each writes what it computed to OUT/rank{r}.pt;
the tests compare it with a single process doing the same work. Nothing here checks anything."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmoe.distributed import DataParallelConfig, Layout, Parallel
from xmoe.moe import MoEConfig, MoELayer, Router

# The layer cases: MoEConfig fields, and the tokens each rank routes (uneven, and zero).
LAYER_CASES = {
    "threshold-dropless": (dict(threshold=0.8), (7, 3)),
    "threshold-capacity": (dict(threshold=0.8, capacity_factor=1.0, min_capacity=1), (9, 5)),
    "top2-capacity-swiglu": (dict(router="topk", top_k=2, capacity_factor=1.0, min_capacity=1,
                                  activation="swiglu"), (8, 8)),
    "top1-dropless-zero-tokens": (dict(router="topk", top_k=1), (6, 0)),
    # Every token picks expert 0: rank 1 holds experts 4-7 and receives no row at all.
    "top1-one-rank-idle": (dict(router="topk", top_k=1), (5, 4)),
}
BACKENDS = ("loop", "fused", "grouped_mm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args, join: bool = True, timeout_s: float = 300):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by gloo (collectives
    time out after ``timeout_s``); without ``join``, the processes' context (``.processes``)."""
    return mp.spawn(_entry, args=(fn, world_size, free_port(), timeout_s, args), nprocs=world_size, join=join)


def _entry(rank: int, fn, world_size: int, port: int, timeout_s: float, args) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def layer_case(name: str, backend: str, rank: int | None = None):
    """The full layer of a case and every rank's tokens and upstream gradients (same on all ranks)."""
    fields, tokens = LAYER_CASES[name]
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=8, num_experts=8, expert_dim=16, backend=backend, **fields))
    with torch.no_grad():
        layer.router.weight.mul_(3.0)  # tokens want 2-5 experts, and capacity overflows
        if name.endswith("idle"):
            layer.router.weight.zero_()
            layer.router.weight[0, 0] = 1.0
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 8, generator=gen).abs() for n in tokens]  # x[:, 0] > 0: expert 0 wins when "idle"
    gs = [torch.randn(n, 8, generator=gen) for n in tokens]
    return layer, xs, gs


def run_layer_cases(rank: int, world_size: int, out: str) -> None:
    parallel = Parallel(Layout(world_size=world_size, ep_size=world_size))
    replicated = DataParallelConfig(impl="allreduce")  # the router whole on every rank: its raw per-rank gradient
    results = {}
    for name in LAYER_CASES:
        for backend in BACKENDS:
            layer, xs, gs = layer_case(name, backend)
            parallel.shard(layer, replicated)
            x = xs[rank].clone().requires_grad_(True)
            result = layer(x)
            (result.output * gs[rank]).sum().add(0.1 * result.aux_loss).backward()
            results[name, backend] = {
                "output": result.output.detach(),
                "x_grad": x.grad,
                "aux_loss": result.aux_loss.detach(),
                "router_grad": layer.router.weight.grad,
                "experts": {n: getattr(layer.experts, n).grad for n in ("w1", "b1", "w2", "b2", "w3", "b3")
                            if getattr(layer.experts, n) is not None},
                "kept": int(result.stats.tokens_per_expert.sum()),
            }
    torch.save(results, Path(out) / f"rank{rank}.pt")


def run_training(rank: int, world_size: int, cfg_dict: dict, run_dir: str, ep_size: int, probe: torch.Tensor,
                 resume: bool = False) -> None:
    """Train with ``world_size`` ranks; record how the trained model is laid out on this rank
    and how many forwards its evaluations ran; then reload the checkpoint into a sharded model and save its logits on ``probe`` (every rank
    computes the same)."""
    from torch.distributed.tensor import DTensor

    from xmoe.models.gpt import GPT
    from xmoe.training import from_dict, load_checkpoint, read_config
    from xmoe.tasks.lm import LMRunConfig, train_lm
    from xmoe.training import loop

    parallel = Parallel(Layout(world_size=world_size, ep_size=ep_size))
    cfg = from_dict(LMRunConfig, cfg_dict)
    trained = {}
    original = loop.build_optimizer

    def keep(model, train_cfg):  # the loop's model and optimizer, as the ranks hold them
        trained["model"] = model
        trained["eval_forwards"] = evaluated = []
        model.register_forward_pre_hook(lambda module, args: None if module.training else evaluated.append(1))
        trained["optimizer"] = optimizer = original(model, train_cfg)
        return optimizer

    loop.build_optimizer = keep
    train_lm(cfg, run_dir, progress=False, ranks=parallel, resume=resume)
    loop.build_optimizer = original
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    layout = {name: {"dtensor": isinstance(p, DTensor), "local_numel": local(p).numel(), "numel": p.numel()}
              for name, p in trained["model"].named_parameters()}
    adam_bytes = sum(local(v).nbytes for entry in trained["optimizer"].state.values() for v in entry.values()
                     if v.ndim > 0)

    saved = from_dict(LMRunConfig, read_config(run_dir))
    model = GPT(saved.model)
    parallel.shard(model)
    load_checkpoint(run_dir, model, ranks=parallel)
    model.eval()
    with torch.no_grad():
        logits = model(probe).logits_BLV
    torch.save({"logits": logits, "layout": layout, "adam_bytes": adam_bytes,
                "eval_forwards": len(trained["eval_forwards"])}, Path(run_dir) / f"probe-rank{rank}.pt")


def run_until_stopped(rank: int, world_size: int, cfg_dict: dict, run_dir: str, ep_size: int) -> None:
    """Train until something stops the run (a signal, a rank that dies); write what this rank
    saw to stopped-rank{r}.json beside RUN (a run that fails before its first checkpoint is
    removed): the result, or the error and when it was raised."""
    from xmoe.training import from_dict
    from xmoe.tasks.lm import LMRunConfig, train_lm
    from xmoe.training import loop

    saves = []
    original = loop.save_sharded_checkpoint

    def counted(*args, **kwargs):
        saves.append(kwargs["step"])
        return original(*args, **kwargs)

    loop.save_sharded_checkpoint = counted
    report = Path(run_dir).parent / f"stopped-rank{rank}.json"
    cfg = from_dict(LMRunConfig, cfg_dict)
    parallel = Parallel(Layout(world_size=world_size, ep_size=ep_size), timeout_s=cfg.train.collective_timeout_s)
    try:
        result = train_lm(cfg, run_dir, progress=False, ranks=parallel)
        report.write_text(json.dumps({"steps": result.steps, "signal": result.signal, "saves": saves}))
    except Exception as err:
        report.write_text(json.dumps({"error": f"{type(err).__name__}: {err}", "at": time.time(), "saves": saves}))
        os._exit(1)  # as the CLI would exit; no process-group teardown with a dead peer


def run_mixed_precision(rank: int, world_size: int, tokens: torch.Tensor, out: str) -> None:
    """One forward and backward of the debug GPT with FSDP's bf16 policy under bf16 autocast, as
    the loop runs it on a GPU (here on CPU gloo): this rank's loss, gradient norm and the dtype
    of the gradients the optimizer will see."""
    from xmoe.models.gpt import GPT
    from xmoe.presets import get_preset

    torch.manual_seed(0)
    model = GPT(get_preset("debug-xmoe"))
    parallel = Parallel(Layout(world_size=world_size, ep_size=world_size))
    parallel.shard(model, DataParallelConfig(mixed_precision=True))
    seen = []  # the dtype of a block's (gathered) parameters while it runs
    model.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(block.ln_1.weight.dtype))
    router = next(m for m in model.modules() if isinstance(m, Router))
    gates = []  # and of a router's: routing decides on fp32 gates
    router.register_forward_pre_hook(lambda module, args: gates.append(module.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[rank], tokens[rank]).loss
    loss.backward()
    parallel.sync_gradients(model)
    norm = parallel.clip(model, 0.0)
    dtypes = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    torch.save({"loss": float(loss), "grad_norm": float(norm), "dtypes": dtypes, "forward_dtype": seen[0],
                "router_dtype": gates[0]},
               Path(out) / f"rank{rank}.pt")


EVAL_LAYOUTS = {"dp2-fsdp": 1, "ep2-fsdp": 2}  # name: ep_size, on 2 ranks


def run_evaluation(rank: int, world_size: int, batches: list, out: str) -> None:
    """Evaluate the seeded debug GPT on ``batches`` (the same on every rank) once per layout of
    EVAL_LAYOUTS, each rank its share; save each result and how many forwards this rank ran."""
    from xmoe.models.gpt import GPT
    from xmoe.presets import get_preset
    from xmoe.tasks.lm import evaluate_lm

    results = {}
    for name, ep_size in EVAL_LAYOUTS.items():
        torch.manual_seed(0)
        model = GPT(get_preset("debug-xmoe"))
        parallel = Parallel(Layout(world_size=world_size, ep_size=ep_size))
        parallel.shard(model)
        forwards = []
        model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        results[name] = {"eval": evaluate_lm(model, batches, precision="fp32", ranks=parallel).to_dict(),
                         "forwards": len(forwards)}
    torch.save(results, Path(out) / f"rank{rank}.pt")
