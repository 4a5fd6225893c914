"""One training loop for every model: the task says what a batch and a loss are; the loop does
the rest (device, precision, accumulation, clipping, schedule, logging, evaluation,
checkpoints, exact resume, stopping on Ctrl-C or SIGTERM: xmoe.training.stopping).

A task is any object with:

    train_batch(index) -> tuple of tensors        a pure function of index: exact resume
    loss(model, batch) -> (loss, logs)             the loss to backpropagate and numbers to log
    evaluate(model, ranks) -> dict                 validation metrics (the model is in eval mode),
                                                   each rank evaluating its share (xmoe.distributed.Ranks)
    tokens(batch) -> int                           tokens in a batch, for tokens/s

In a distributed run (``parallel``, xmoe.distributed.Parallel) every rank runs this same loop
on its own micro-batches; the parallel object shards the model (FSDP2, expert parallelism),
averages gradients and computes the global gradient norm. Every rank writes its shards of each
checkpoint; rank 0 alone logs. A stop signal on any rank stops every rank after the same step,
and a rank that dies or hangs stops the others with RanksLost (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from xmoe.distributed import DataParallel, Ranks, RanksLost, SingleProcess, lost_contact, reshard
from xmoe.errors import UsageError
from xmoe.moe.dial import budget_dials, step_budgets

from .checkpoint import (
    CheckpointError,
    checkpoint_dir,
    load_checkpoint,
    read_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .config import TrainConfig
from .manifest import hash_run_files
from .metrics import MetricsLog, NoLog
from .optim import build_optimizer, lr_at
from .stopping import StopSignals


class Task(Protocol):
    def train_batch(self, index: int) -> tuple[Tensor, ...]: ...
    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Any]]: ...
    def evaluate(self, model: nn.Module, ranks: Ranks) -> dict[str, Any]: ...
    def tokens(self, batch: tuple[Tensor, ...]) -> int: ...


@dataclass(frozen=True)
class TrainResult:
    steps: int
    train_losses: list[float]  # loss of every optimizer step this call ran
    final_eval: dict[str, Any]
    interrupted: bool
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if any


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu or auto")
    return device


def autocast_context(device: torch.device, precision: str):
    if _bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def train(model: nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path, *, config: dict,
          resume: bool = False, progress: bool = True, extra_state: dict | None = None,
          parallel: Ranks | None = None, run_files: tuple[str, ...] = ()) -> TrainResult:
    """Train ``model`` on ``task`` for ``cfg.max_steps`` optimizer steps, checkpointing to ``run_dir``.

    ``extra_state`` is saved in each checkpoint's state.json (e.g. the corpus fingerprint).
    ``parallel``: this process's place in a distributed run (default: a run of one).
    ``run_files``: files of ``run_dir`` each checkpoint is bound to (the tokenizer).
    """
    run_dir = Path(run_dir)
    parallel = parallel or SingleProcess()
    device = parallel.device or resolve_device(cfg.device)
    model.to(device)
    parallel.shard(model, DataParallel(impl=cfg.dp_impl, reshard_after_forward=cfg.reshard_after_forward,
                                       mixed_precision=device.type == "cuda" and _bf16(device, cfg.precision)))
    optimizer = build_optimizer(model, cfg)
    start, run_id = 0, None
    if resume:
        state = load_checkpoint(run_dir, model, optimizer, restore_rng=True, parallel=parallel)
        start, run_id = state["step"], state.get("run_id")
        if start >= cfg.max_steps:
            raise UsageError(
                f"the checkpoint in {run_dir} is already at step {start}; to continue, raise "
                f"train.max_steps above {start} (e.g. --train.max_steps={2 * start})"
            )
    else:
        torch.manual_seed(cfg.seed + parallel.rank)  # ranks draw their own dropout masks
    log = MetricsLog(run_dir / "metrics.jsonl", keep_before=start) if parallel.is_main else NoLog()
    step_model = torch.compile(model) if cfg.compile else model

    # Every checkpoint of the run carries its id (xmoe.training.manifest); one id on every rank.
    run_id = parallel.broadcast((run_id or uuid.uuid4().hex) if parallel.is_main else None)
    extra_state = {**(extra_state or {}), "run_id": run_id}

    def save(step: int) -> None:
        _check_finite(model, step, run_dir, parallel)  # collective
        files = hash_run_files(run_dir, run_files) if parallel.is_main else {}
        if parallel.world_size == 1:
            save_checkpoint(run_dir, model=model, optimizer=optimizer, step=step, config=config, extra=extra_state,
                            run_files=files)
        else:  # every rank writes its shards
            save_sharded_checkpoint(run_dir, model, optimizer, parallel=parallel, step=step, config=config,
                                    extra=extra_state, run_files=files)

    losses = []
    done = start  # optimizer steps applied to the weights: what a checkpoint must say
    saved = start if resume else None  # the step of the checkpoint on disk
    bar = _progress(start, cfg.max_steps, progress and parallel.is_main)
    with StopSignals() as stop, _failing_together(parallel, run_dir, cfg, lambda: done):
        try:
            for step in range(start, cfg.max_steps):
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)
                model.train()
                t0 = time.perf_counter()
                logs, tokens, grad_norm = _step_gradients(step_model, model, task, cfg, step, device, parallel)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_budgets(model, parallel.sum_tensor)  # budgeted routers: t follows the step's experts/token
                done = step + 1
                seconds = time.perf_counter() - t0
                losses.append(logs["loss"])
                row = {"step": done, "split": "train", "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens / seconds, **logs}
                if done % cfg.log_every == 0 or step == 0:
                    log.write(row | _budget_thresholds(model))
                bar.update(1)
                bar.set_postfix_str(_postfix(row), refresh=False)
                if _stop_requested(stop, parallel):
                    break  # the final save below follows at once: no periodic evaluation or save first
                last = done == cfg.max_steps
                evaluate = cfg.eval_every and done % cfg.eval_every == 0 and not last
                if evaluate:
                    log.write({"step": done, "split": "val", **_evaluate(model, task, parallel)})
                if cfg.save_every and done % cfg.save_every == 0 and not last:
                    save(done)
                    saved = done
                    if _stop_requested(stop, parallel):  # during the save: stop now, not a step later
                        break
                elif evaluate and _stop_requested(stop, parallel):
                    break
        except KeyboardInterrupt:  # raised by code, or where no handler could be installed
            stop.request(signal.SIGINT)
        finally:
            bar.close()
        if saved != done:
            save(done)
        final = {}
        if stop.signum is None:
            try:
                with stop.interruptible():
                    final = _evaluate(model, task, parallel)
            except KeyboardInterrupt:  # the checkpoint is safe; only the evaluation is skipped
                stop.request(signal.SIGINT)
    if final:
        log.write({"step": done, "split": "val", **final})
    log.close()
    return TrainResult(steps=done, train_losses=losses, final_eval=final, interrupted=stop.signum is not None,
                       signal=stop.signum)


@contextlib.contextmanager
def _failing_together(parallel, run_dir: Path, cfg: TrainConfig, done: Callable[[], int]):
    """A collective that failed because another rank is gone (its process ended: noticed at
    once; it hangs: after train.collective_timeout_s) becomes a RanksLost on this rank that
    says so, where the run stood and what to resume from. Every rank stops, none hangs."""
    try:
        yield
    except RuntimeError as err:
        if parallel.world_size == 1 or isinstance(err, RanksLost) or not lost_contact(err):
            raise
        reason = str(err).split(". ")[0]
        raise RanksLost(
            f"rank {parallel.rank} lost contact with another rank during step {done() + 1}: a rank died or stopped "
            f"answering for train.collective_timeout_s={cfg.collective_timeout_s:g} s ({reason}). Every rank "
            f"stops; {_last_checkpoint(run_dir)}"
        ) from None


def _last_checkpoint(run_dir: Path) -> str:
    try:
        step = read_state(checkpoint_dir(run_dir))["step"]
    except CheckpointError:
        return f"no checkpoint was saved in {run_dir} yet"
    return f"the last checkpoint (step {step}) in {run_dir} is intact: continue with --out {run_dir} --resume"


def _stop_requested(stop: StopSignals, parallel) -> bool:
    """Whether any rank received a stop signal; every rank gets the same answer, so all stop
    after the same step and the collective save matches up (one small all-reduce when
    distributed; nothing in a single process)."""
    if parallel.sum(int(stop.signum is not None)):
        stop.request(signal.SIGINT)  # a rank that saw no signal stops with the others
        return True
    return False


def _step_gradients(step_model: nn.Module, model: nn.Module, task: Task, cfg: TrainConfig, step: int,
                    device: torch.device, parallel):
    """Gradients of step ``step`` (0-based), reduced over ranks and clipped; raises before the
    optimizer steps if the loss, the gradients or the router logits are not finite."""
    try:
        logs, tokens = _accumulate(step_model, task, cfg, step, device, parallel)
    except FloatingPointError as err:  # the MoE layer's check of its router logits
        cause = str(err).split(",")[0].split(";")[0]  # its first clause: what was not finite
        raise FloatingPointError(f"the run diverged at step {step + 1}: {cause}; {_NOT_SAVED}") from None
    parallel.sync_gradients(model)
    grad_norm = parallel.clip(model, cfg.grad_clip)
    logs, tokens = parallel.mean(logs), parallel.sum(tokens)
    if not (math.isfinite(logs["loss"]) and math.isfinite(grad_norm)):
        # Raise before stepping, so neither the weights nor any checkpoint see it.
        raise FloatingPointError(
            f"the run diverged at step {step + 1}: loss {logs['loss']}, gradient norm {grad_norm}; {_NOT_SAVED}"
        )
    return logs, tokens, grad_norm


_NOT_SAVED = "nothing was updated or saved (the last checkpoint, if any, is unchanged). Train again with a lower train.lr"


def _check_finite(model: nn.Module, step: int, run_dir: Path, parallel) -> None:
    """Refuse to save weights that hold NaN or inf: a checkpoint must stay loadable. Each rank
    checks its own shards; all refuse together."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(local(t)).all()]
    if parallel.sum(len(bad)):
        bad = bad or ["on another rank"]
        raise FloatingPointError(
            f"the run diverged by step {step}: the weights hold NaN or inf ({', '.join(bad[:3])}); not saved, "
            f"the last checkpoint in {run_dir} is unchanged. Lower train.lr and resume from it, or start again"
        )


def _accumulate(model: nn.Module, task: Task, cfg: TrainConfig, step: int, device: torch.device, parallel):
    totals: dict[str, float] = {}
    tokens = 0
    for micro in range(cfg.grad_accum):
        index = parallel.batch_index(step * cfg.grad_accum + micro)
        batch = tuple(t.to(device) for t in task.train_batch(index))
        with autocast_context(device, cfg.precision):
            loss, logs = task.loss(model, batch)
        (loss / cfg.grad_accum).backward()
        tokens += task.tokens(batch)
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + float(value) / cfg.grad_accum
    return totals, tokens


def _budget_thresholds(model: nn.Module) -> dict[str, float]:
    """t of each budgeted MoE layer (``threshold_layers``) and their mean, for the log."""
    dials = budget_dials(model)
    if not dials:
        return {}
    ts = torch.stack([d.threshold for d in dials]).tolist()  # one read for every layer
    return {"threshold": sum(ts) / len(ts), "threshold_layers": ts}


def _evaluate(model: nn.Module, task: Task, parallel: Ranks) -> dict[str, Any]:
    metrics = task.evaluate(model, parallel)  # the task sets eval mode, no_grad and precision
    reshard(model)  # FSDP parameters an evaluation left gathered
    return metrics


def _postfix(row: dict) -> str:
    parts = [f"loss {row['loss']:.3f}", f"{row['tokens_per_s']:.0f} tok/s"]
    if "experts_per_token" in row:
        parts.append(f"experts/token {row['experts_per_token']:.2f}")
    return ", ".join(parts)


def _progress(start: int, total: int, enabled: bool, file=None):
    """The progress bar on stderr: live on a terminal; redirected to a file (a scheduler's log),
    redrawn once a minute (PROGRESS_TO_FILE_S) so that it does not flood the log."""
    import sys

    from tqdm.auto import tqdm

    file = file or sys.stderr
    interactive = getattr(file, "isatty", lambda: False)()
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, file=file,
                mininterval=0.1 if interactive else PROGRESS_TO_FILE_S)


PROGRESS_TO_FILE_S = 60.0


__all__ = ["Task", "TrainResult", "train", "resolve_device", "autocast_context", "checkpoint_dir"]
