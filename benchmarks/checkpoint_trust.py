"""What reading a sharded checkpoint safely costs: xmoe's load (ShardReader: the restricted
unpickler, each non-tensor value checked by the weights-only unpickler, shard files checked,
the run stamps read first; the manifest's checksums left out) against torch.distributed.checkpoint's
own FileSystemReader, on the same one-process sharded checkpoint with optimizer state.

    python benchmarks/checkpoint_trust.py [--preset debug-xmoe] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from xmoe.distributed import SingleProcess
from xmoe.models.gpt import GPT
from xmoe.training import to_dict
from xmoe.tasks.lm import lm_run_config
from xmoe.training.checkpoint import Manifest, _read_shards, _state_template, save_sharded_checkpoint
from xmoe.training.loop import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="debug-xmoe")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = lm_run_config(args.preset)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_sharded_checkpoint(tmp, model, optimizer, ranks=SingleProcess(), step=1, config=to_dict(cfg))
        size = sum(f.stat().st_size for f in (folder / "dcp").iterdir()) / 1e6
        template = lambda: _state_template(model, optimizer, SingleProcess()).saved
        plain = lambda: dcp.load(template(), storage_reader=FileSystemReader(folder / "dcp"), no_dist=True)
        safe = lambda: _read_shards(folder, template(), Manifest(folder))
        times = {"torch FileSystemReader": [], "xmoe ShardReader + stamps": []}
        for _ in range(args.repeats):  # interleaved
            for name, load in zip(times, (plain, safe)):
                t0 = time.perf_counter()
                load()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["torch FileSystemReader"])
    print(f"{args.preset}: sharded checkpoint of {size:.1f} MB (weights + AdamW state), "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:28s} {median * 1e3:7.1f} ms  ({median / base:.2f}x)")


if __name__ == "__main__":
    main()
