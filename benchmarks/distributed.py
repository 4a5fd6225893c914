"""Data and expert parallelism on one machine: memory per rank, step time and the share of the
step spent in communication, for FSDP2 (train.dp_impl=fsdp) against the replicated all-reduce path
(train.dp_impl=allreduce), in one run.

    python benchmarks/distributed.py                                  # CPU, gloo, the default configurations
    python benchmarks/distributed.py --preset cpu-xmoe-64x128 --configs 1 dp2:fsdp dp2:allreduce --steps 7

A configuration is ``1`` (one process) or ``dpD[xepE]:IMPL`` (D x E processes, e.g. ``ep2:fsdp``,
``dp2xep2:allreduce``). Each runs full training steps of a GPT preset (forward, backward,
gradient sync, clipping, AdamW step) on random tokens, ``--batch`` sequences of ``--seq-len`` per
rank, and reports:

    memory     bytes of the tensors each rank holds (its own shards: ``to_local()`` of a DTensor)
               for parameters, gradients and Adam's state, the largest over ranks. Honest on CPU;
               FSDP's transient all-gathered block (one at a time) is not included.
    step ms    median over ``--steps`` after ``--warmup``
    comm       the share of the step inside torch.distributed collectives (all_reduce,
               all_to_all_single, FSDP's all-gather and reduce-scatter...), timed by wrapping them
               in this script's processes only; an asynchronous collective is waited for at once,
               so the time counts what the rank waited (on CPU gloo nothing overlaps anyway).

Same cores for every row: ``--threads`` in all, split over the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from xmoe.distributed import DataParallelConfig, Layout, Parallel, SingleProcess
from xmoe.models.gpt import GPT
from xmoe.presets import get_preset
from xmoe.training import TrainConfig
from xmoe.training.loop import build_optimizer

COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather_single", "reduce_scatter_single",
               "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast")
DEFAULT_CONFIGS = ("1", "dp2:allreduce", "dp2:fsdp", "ep2:allreduce", "ep2:fsdp")


@dataclass(frozen=True)
class Config:
    name: str
    dp: int
    ep: int
    impl: str

    @property
    def world(self) -> int:
        return self.dp * self.ep


def parse_config(text: str) -> Config:
    if text == "1":
        return Config("1 process", 1, 1, "none")
    match = re.fullmatch(r"(?:dp(\d+))?x?(?:ep(\d+))?:(fsdp|allreduce)", text)
    if match is None or not (match.group(1) or match.group(2)):
        raise ValueError(f"configuration {text!r}: write 1, or dpD[xepE]:fsdp|allreduce (e.g. dp2:fsdp, ep2:allreduce)")
    dp, ep = int(match.group(1) or 1), int(match.group(2) or 1)
    return Config(text, dp, ep, match.group(3))


class CommTimer:
    """Seconds spent in torch.distributed collectives, by wrapping them (this process only)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, collective):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            work = collective(*args, **kwargs)
            if kwargs.get("async_op") and work is not None:
                work.wait()
            self.seconds += time.perf_counter() - t0
            return work

        return timed


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def run(rank: int, config: Config, args, port: int, results) -> None:
    torch.set_num_threads(max(1, args.threads // config.world))
    parallel = SingleProcess()
    timer = CommTimer()
    if config.world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.world)
        parallel = Parallel(Layout(world_size=config.world, ep_size=config.ep))
    torch.manual_seed(0)
    model = GPT(get_preset(args.preset))
    parallel.shard(model, DataParallelConfig(impl=config.impl if config.world > 1 else "allreduce"))
    optimizer = build_optimizer(model, TrainConfig())
    gen = torch.Generator().manual_seed(rank)
    vocab = model.cfg.vocab_size
    steps, comms, grads_bytes = [], [], 0
    for step in range(args.warmup + args.steps):
        x = torch.randint(vocab, (args.batch, args.seq_len), generator=gen)
        y = torch.randint(vocab, (args.batch, args.seq_len), generator=gen)
        timer.seconds = 0.0
        t0 = time.perf_counter()
        model(x, y).loss.backward()
        parallel.sync_gradients(model)
        parallel.clip(model, 1.0)
        grads_bytes = _local_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            steps.append(time.perf_counter() - t0)
            comms.append(timer.seconds)
    row = {"rank": rank, "step_s": statistics.median(steps), "comm_s": statistics.median(comms),
           "params_bytes": _local_bytes(model.parameters()), "grads_bytes": grads_bytes,
           "optimizer_bytes": _local_bytes(v for s in optimizer.state.values() for v in s.values() if v.ndim > 0)}
    results.put(row)
    if config.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(config: Config, args) -> dict:
    """One configuration: its processes' rows, the largest memory and the slowest step."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=run, args=(r, config, args, port, results)) for r in range(config.world)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"configuration {config.name}: a rank exited with {p.exitcode}")
    slowest = max(rows, key=lambda r: r["step_s"])
    out = {key: max(r[key] for r in rows) for key in ("params_bytes", "grads_bytes", "optimizer_bytes")}
    out.update(name=config.name, world=config.world, dp=config.dp, ep=config.ep, impl=config.impl,
               step_s=slowest["step_s"], comm_s=slowest["comm_s"],
               tokens_per_s=config.world * args.batch * args.seq_len / slowest["step_s"])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict], args) -> str:
    mb = lambda b: f"{b / 2**20:.2f}"
    lines = [f"preset {args.preset}, {args.batch} x {args.seq_len} tokens per rank, {args.threads} threads in all, "
             f"full training steps, median of {args.steps}",
             "| configuration | params MiB/rank | grads MiB/rank | Adam MiB/rank | total MiB/rank | step ms | tokens/s | comm share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
        lines.append(f"| {r['name']} | {mb(r['params_bytes'])} | {mb(r['grads_bytes'])} | {mb(r['optimizer_bytes'])} "
                     f"| {mb(total)} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['comm_s'] / r['step_s']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-xmoe-64x128")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for a configuration")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    rows = [measure(c, args) for c in configs]
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
