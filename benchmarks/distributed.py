"""Expert parallelism: tokens/s and the share of time spent in the all_to_all exchange.

    python benchmarks/distributed.py                       # CPU, gloo: 1 process vs 2 (EP=2, DP=2)
    python benchmarks/distributed.py --tokens 4096 --layers 2 --steps 10

Each configuration runs forward + backward of a stack of MoE layers (threshold router, the
paper's t = 0.9, router weights scaled so a token takes a few experts) on ``--tokens`` tokens
per rank, and reports the median step time over ``--steps`` steps after a warm-up. The exchange
time is measured by timing every ``all_to_all_single`` call of the expert-parallel layers
(counts and rows, forward and backward) in this script only; gradient all-reduce time (DP) is
timed around ``Parallel.sync_gradients``. Same cores for every row: 1 process uses all
``--threads``, 2 processes get half each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmoe.distributed import Layout, Parallel
from xmoe.distributed import experts as ep_module
from xmoe.moe import MoEConfig, MoELayer


def build(args) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    cfg = MoEConfig(model_dim=args.dim, num_experts=args.experts, expert_dim=args.expert_dim, threshold=0.9)
    layers = torch.nn.ModuleList(MoELayer(cfg) for _ in range(args.layers))
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.mul_(args.router_scale)
    return layers


def run(rank: int, world: int, ep_size: int, args, port: int, results) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    layers = build(args)
    parallel = None
    if world > 1:
        parallel = Parallel(Layout(world_size=world, ep_size=ep_size))
        parallel.shard(layers)
    exchange = [0.0]
    original = dist.all_to_all_single

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        exchange[0] += time.perf_counter() - t0
        return out

    ep_module.dist.all_to_all_single = timed  # this benchmark's own probe; the library is untouched
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.dim, generator=gen)
    steps, shares, syncs, experts = [], [], [], []
    for step in range(args.warmup + args.steps):
        exchange[0] = 0.0
        t0 = time.perf_counter()
        h = x.clone().requires_grad_(True)
        out, kept = h, []
        for layer in layers:
            o = layer(out)
            out = out + o.output
            kept.append(float(o.stats.kept_per_token))
        out.square().mean().backward()
        t_sync = time.perf_counter()
        if parallel is not None:
            parallel.sync_gradients(layers)
        t1 = time.perf_counter()
        for p in layers.parameters():
            p.grad = None
        if step >= args.warmup:
            steps.append(t1 - t0)
            shares.append(exchange[0])
            syncs.append(t1 - t_sync)
            experts.append(sum(kept) / len(kept))
    if rank == 0:
        results.put({"step_s": statistics.median(steps), "exchange_s": statistics.median(shares),
                     "grad_sync_s": statistics.median(syncs), "experts_per_token": statistics.mean(experts)})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(world: int, ep_size: int, args) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=run, args=(r, world, ep_size, args, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    row = results.get()
    for p in procs:
        p.join()
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--expert-dim", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--router-scale", type=float, default=8.0, help="sharpens the random router")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    configs = [("1 process", 1, 1), ("2 processes, EP=2", 2, 2), ("2 processes, DP=2", 2, 1)]
    rows = []
    for name, world, ep in configs:
        r = measure(world, ep, args)
        r.update(name=name, world=world, ep=ep, tokens_per_s=world * args.tokens / r["step_s"])
        rows.append(r)
    base = rows[0]["tokens_per_s"]
    print(f"T={args.tokens}/rank, D={args.dim}, F={args.expert_dim}, E={args.experts}, {args.layers} MoE layers, "
          f"{args.threads} threads in all, forward+backward, median of {args.steps}")
    print("| configuration | experts/token | step ms | tokens/s | vs 1 process | exchange share | grad sync share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['experts_per_token']:.2f} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} "
              f"| {r['tokens_per_s'] / base:.2f}x | {r['exchange_s'] / r['step_s']:.0%} "
              f"| {r['grad_sync_s'] / r['step_s']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
