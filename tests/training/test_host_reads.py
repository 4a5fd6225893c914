"""The loop reads nothing to the host between its log steps (nanoGPT's and torchtitan's rule), and
what it reads at a log step is what the steps computed.

On a CPU there is no device to wait for, so reads are counted as a GPU would pay for them: every
``.item()``/``float()``/``bool()``/``.tolist()`` of a tensor (xmoe.bench.probes.HostReads), by
the line that asked. Reads inside torch's optimizer are not counted: Adam keeps its step counter
on the host (a CPU tensor even on a GPU), so reading it waits for no device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmoe.bench.probes import HostReads
from xmoe.distributed import SingleProcess
from xmoe.training import TrainConfig, read_metrics, train


class LinearTask:
    """Least squares on seeded random batches; records each micro-batch's loss recomputed in
    float64 from the weights it saw (the oracle for the logged numbers)."""

    def __init__(self) -> None:
        self.micro_batches: list[int] = []  # the number of host reads seen when each one started
        self.reads: HostReads | None = None
        self.oracle: list[tuple[torch.Tensor, torch.Tensor]] = []

    def train_batch(self, index: int):
        self.micro_batches.append(len(self.reads.sites) if self.reads is not None else 0)
        g = torch.Generator().manual_seed(index)
        return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)

    def tokens(self, batch) -> int:
        return batch[0].shape[0]

    def loss(self, model: nn.Linear, batch):
        x, y = batch
        err = model(x) - y
        w, b = model.weight.detach().double(), model.bias.detach().double()
        err64 = x.double() @ w.T + b - y.double()
        self.oracle.append((err64.pow(2).mean(), err64.abs().mean()))  # kept as tensors: no read here
        loss = err.pow(2).mean()
        return loss, {"loss": loss.detach(), "mae": err.abs().mean().detach()}

    def evaluate(self, model, ranks) -> dict:
        return {"loss": 0.0}


def _loop_reads(sites: list[str]) -> list[str]:
    return [s for s in sites if "torch/optim/" not in s]


def test_no_host_read_between_log_steps_and_logged_values_match_float64(tmp_path) -> None:
    accum, steps, log_every = 2, 7, 3
    cfg = TrainConfig(max_steps=steps, grad_accum=accum, log_every=log_every, eval_every=0, save_every=0,
                      lr=1e-2, device="cpu")
    torch.manual_seed(0)
    model, task = nn.Linear(3, 2), LinearTask()
    with HostReads() as reads:
        task.reads = reads
        train(model, task, cfg, tmp_path / "run", config={}, progress=False, ranks=SingleProcess())
    # The reads between the start of micro-batch m and of the next one belong to m (its step's
    # end, and the step's read if it is a log step).
    bounds = task.micro_batches + [len(reads.sites)]
    per_micro = [_loop_reads(reads.sites[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert len(per_micro) == steps * accum
    logged_steps = {1} | {s for s in range(1, steps + 1) if s % log_every == 0}
    for m, sites in enumerate(per_micro):
        step, last_micro = m // accum + 1, m % accum == accum - 1
        if not (last_micro and step in logged_steps) and step != steps:
            assert sites == [], f"micro-batch {m} (step {step}) read the host at {sites}"
    assert len(_loop_reads(reads.sites[bounds[accum - 1]:bounds[accum]])) == 1  # step 1: one batched read

    rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(rows) == sorted(logged_steps)
    for step, row in rows.items():
        micro = task.oracle[(step - 1) * accum:step * accum]
        mse = math.fsum(float(a) for a, _ in micro) / accum
        mae = math.fsum(float(b) for _, b in micro) / accum
        assert math.isclose(row["loss"], mse, rel_tol=1e-6), (step, row["loss"], mse)
        assert math.isclose(row["mae"], mae, rel_tol=1e-6), (step, row["mae"], mae)
        assert row["lr"] > 0 and row["grad_norm"] > 0 and row["tokens_per_s"] > 0
