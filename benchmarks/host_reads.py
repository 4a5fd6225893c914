"""Host reads per training micro-batch on the steps that do not log: how often the training loop
makes the host wait for the device (a `.item()`, `float(t)`, `bool(t)` or `.tolist()`).

    PYTHONPATH=src python benchmarks/host_reads.py            # debug-xmoe LM, 8 steps, log_every 4
    PYTHONPATH=src python benchmarks/host_reads.py cuda       # the same run on a GPU

On the CPU no read waits; reads are counted as a GPU would pay for them
(xmoe.bench.probes.HostReads), each by the file that asked for it: the training floor
(xmoe/training, xmoe/tasks, xmoe/distributed), the MoE layer (xmoe/moe: one read per forward
for its expert counts, none in static mode), and torch's optimizer (Adam's step counter, a CPU
tensor even on a GPU: no wait). A micro-batch starts at the model's forward; the reads up to the
next one are its own (its backward, and its step's end when it is the step's last).
"""

from __future__ import annotations

import collections
import random
import sys
import tempfile
from pathlib import Path

import torch

from xmoe.bench.probes import HostReads
from xmoe.data import DataConfig
from xmoe.training import TrainConfig
from xmoe.tasks.lm import lm_run_config, train_lm

STEPS, GRAD_ACCUM, LOG_EVERY = 8, 2, 4
FLOORS = (("training floor", ("xmoe/training/", "xmoe/tasks/", "xmoe/distributed/")), ("MoE layer", ("xmoe/moe/",)),
          ("torch's optimizer", ("torch/optim/",)))


def floor(site: str) -> str:
    return next((name for name, parts in FLOORS if any(part in site for part in parts)), "other: " + site)


def main(device: str = "cpu") -> None:
    torch.set_num_threads(1)
    words = "the quick brown fox jumps over the lazy dog while experts route tokens".split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
        cfg = lm_run_config("debug-xmoe", data=DataConfig(path=str(corpus), vocab_size=300, cache_dir=f"{tmp}/cache"),
                            train=TrainConfig(max_steps=STEPS, grad_accum=GRAD_ACCUM, log_every=LOG_EVERY,
                                              batch_size=4, seq_len=32, eval_every=0, save_every=0, device=device))
        starts: list[int] = []
        with HostReads() as reads:
            def mark(module, args):
                if type(module).__name__ == "GPT" and module.training:
                    starts.append(len(reads.sites))

            hook = torch.nn.modules.module.register_module_forward_pre_hook(mark)
            try:
                train_lm(cfg, Path(tmp) / "run", progress=False)
            finally:
                hook.remove()
    bounds = starts + [len(reads.sites)]
    quiet = [m for m in range(STEPS * GRAD_ACCUM)  # micro-batches of steps that neither log nor end the run
             if not ((m // GRAD_ACCUM + 1) % LOG_EVERY == 0 or m // GRAD_ACCUM == 0 or m // GRAD_ACCUM + 1 == STEPS)]
    per_floor = collections.Counter(floor(s) for m in quiet for s in reads.sites[bounds[m]:bounds[m + 1]])
    print(f"debug-xmoe, {STEPS} steps x {GRAD_ACCUM} micro-batches, log_every {LOG_EVERY}: host reads per "
          f"micro-batch of a step that does not log ({len(quiet)} micro-batches)")
    for name in [n for n, _ in FLOORS] + sorted(k for k in per_floor if k.startswith("other")):
        print(f"  {name:<20} {per_floor[name] / len(quiet):.2f}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
