"""One training loop for every model: the task says what a batch and a loss are; the loop does
the rest (device, precision, accumulation, clipping, schedule, logging, evaluation,
checkpoints, exact resume, stopping on Ctrl-C or SIGTERM: xmoe.training.stopping), with the
XMoE recipe every task trains with: its MoE loss terms (``moe_objective``), optimizer and schedule.

A task is any object with:

    train_batch(index) -> tuple of tensors        a pure function of index: exact resume
    loss(model, batch) -> (loss, logs)             the loss to backpropagate and numbers to log
    evaluate(model, ranks) -> dict                 validation metrics (the model is in eval mode),
                                                   each rank evaluating its share (xmoe.distributed.Ranks)
    tokens(batch) -> int                           tokens in a batch, for tokens/s (counted on the
                                                   host, before the batch moves to the device)

The loop reads nothing to the host between its log steps: a step's numbers stay on the device
until the next log, evaluation or save step reads them all at once (``_Unread``).

In a distributed run (``ranks``, xmoe.distributed.Parallel) every rank runs this same loop
on its own micro-batches; ``ranks`` shards the model (FSDP2, expert parallelism), averages
gradients and computes the global gradient norm. Every rank writes its shards of each
checkpoint; rank 0 alone logs. A stop signal on any rank stops every rank after the same step,
and a rank that dies or hangs stops the others with RanksLost (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
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

from xmoe.distributed import DataParallelConfig, Ranks, RanksLost, SingleProcess, lost_contact, reshard
from xmoe.errors import UsageError
from xmoe.moe import Router
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
from .metrics import METRICS_FILE, MetricsLog, NoLog
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


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device ``name`` ("auto": CUDA if this torch sees a GPU, else CPU) names; a
    mistake is a UsageError naming ``flag``, the setting that gave it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag}={name}: not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag}={name}: this torch sees no CUDA GPU; use {flag}=cpu or {flag}=auto")
    return device


def autocast_context(device: torch.device, precision: str):
    if _bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def train(model: nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path, *, config: dict,
          resume: bool = False, progress: bool = True, extra_state: dict | None = None,
          ranks: Ranks | None = None, run_files: tuple[str, ...] = ()) -> TrainResult:
    """Train ``model`` on ``task`` for ``cfg.max_steps`` optimizer steps, checkpointing to ``run_dir``.

    ``extra_state`` is saved in each checkpoint's state.json (e.g. the corpus fingerprint).
    ``ranks``: this process's place in a distributed run (default: a run of one).
    ``run_files``: files of ``run_dir`` each checkpoint is bound to (the tokenizer).
    """
    run_dir = Path(run_dir)
    ranks = ranks or SingleProcess()
    device = ranks.device or resolve_device(cfg.device, flag="--train.device")
    model.to(device)
    ranks.shard(model, DataParallelConfig(impl=cfg.dp_impl, reshard_after_forward=cfg.reshard_after_forward,
                                       mixed_precision=device.type == "cuda" and _bf16(device, cfg.precision)))
    optimizer = build_optimizer(model, cfg)
    start, run_id = 0, None
    if resume:
        state = load_checkpoint(run_dir, model, optimizer, restore_rng=True, ranks=ranks)
        start, run_id = state["step"], state.get("run_id")
        if start >= cfg.max_steps:
            raise UsageError(
                f"the checkpoint in {run_dir} is already at step {start}; to continue, raise "
                f"train.max_steps above {start} (e.g. --train.max_steps={2 * start})"
            )
    else:
        torch.manual_seed(cfg.seed + ranks.rank)  # ranks draw their own dropout masks
    log = MetricsLog(run_dir / METRICS_FILE, keep_before=start) if ranks.is_main else NoLog()
    step_model = torch.compile(model) if cfg.compile else model

    # Every checkpoint of the run carries its id (xmoe.training.manifest); one id on every rank.
    run_id = ranks.broadcast((run_id or uuid.uuid4().hex) if ranks.is_main else None)
    extra_state = {**(extra_state or {}), "run_id": run_id}

    def save(step: int) -> None:
        _check_finite(model, step, run_dir, ranks)  # collective
        files = hash_run_files(run_dir, run_files) if ranks.is_main else {}
        if ranks.world_size == 1:
            save_checkpoint(run_dir, model=model, optimizer=optimizer, step=step, config=config, extra=extra_state,
                            run_files=files)
        else:  # every rank writes its shards
            save_sharded_checkpoint(run_dir, model, optimizer, ranks=ranks, step=step, config=config,
                                    extra=extra_state, run_files=files)

    losses = []
    done = start  # optimizer steps applied to the weights: what a checkpoint must say
    saved = start if resume else None  # the step of the checkpoint on disk
    unread = _Unread(ranks)  # the steps whose numbers are still on the device
    bar = _progress(start, cfg.max_steps, progress and ranks.is_main)

    def read(log_row: bool) -> None:
        """Bring the unread steps' numbers to the host in one read; raise if one diverged."""
        rows = unread.read(model if log_row else None)
        losses.extend(row["loss"] for row in rows)
        if log_row:
            log.write(rows[-1])
            bar.set_postfix_str(_postfix(rows[-1]), refresh=False)

    with StopSignals() as stop, _failing_together(ranks, run_dir, cfg, lambda: done):
        try:
            for step in range(start, cfg.max_steps):
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)
                unread.add(step + 1, lr, *train_step(step_model, model, task, optimizer, cfg, step, device, ranks))
                done = step + 1
                bar.update(1)
                last = done == cfg.max_steps
                evaluate = cfg.eval_every and done % cfg.eval_every == 0 and not last
                save_now = cfg.save_every and done % cfg.save_every == 0 and not last
                if done % cfg.log_every == 0 or step == 0 or evaluate or save_now:
                    read(log_row=done % cfg.log_every == 0 or step == 0)
                if _stop_requested(stop, ranks):
                    break  # the final save below follows at once: no periodic evaluation or save first
                if evaluate:
                    log.write({"step": done, "split": "val", **_evaluate(model, task, ranks)})
                if save_now:
                    save(done)
                    saved = done
                    if _stop_requested(stop, ranks):  # during the save: stop now, not a step later
                        break
                elif evaluate and _stop_requested(stop, ranks):
                    break
                if evaluate or save_now:
                    unread.restart_clock()  # tokens/s counts training time only
        except KeyboardInterrupt:  # raised by code, or where no handler could be installed
            stop.request(signal.SIGINT)
        finally:
            bar.close()
        read(log_row=False)  # the steps since the last read: a diverged one must not be saved
        if saved != done:
            save(done)
        final = {}
        if stop.signum is None:
            try:
                with stop.interruptible():
                    final = _evaluate(model, task, ranks)
            except KeyboardInterrupt:  # the checkpoint is safe; only the evaluation is skipped
                stop.request(signal.SIGINT)
    if final:
        log.write({"step": done, "split": "val", **final})
    log.close()
    return TrainResult(steps=done, train_losses=losses, final_eval=final, interrupted=stop.signum is not None,
                       signal=stop.signum)


def train_step(step_model: nn.Module, model: nn.Module, task: Task, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig, step: int, device: torch.device, ranks: Ranks) -> tuple[dict[str, Tensor], Tensor, int]:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches forward and backward,
    gradients reduced over the ranks and clipped, the update, the budget controllers' step.

    Returns the step's logs (mean over its micro-batches) and gradient norm as device tensors,
    and this rank's token count: nothing is read to the host here (``_Unread`` reads them at
    the log steps). Batches are counted on the host before they move to the device."""
    model.train()  # an evaluation before this step left it in eval mode
    totals: dict[str, Tensor] = {}
    tokens = 0
    try:
        for micro in range(cfg.grad_accum):
            batch = task.train_batch(ranks.batch_index(step * cfg.grad_accum + micro))
            tokens += task.tokens(batch)
            batch = tuple(t.to(device) for t in batch)
            with autocast_context(device, cfg.precision):
                loss, logs = task.loss(step_model, batch)
            (loss / cfg.grad_accum).backward()
            for key, value in logs.items():
                value = torch.as_tensor(value).detach().float()
                totals[key] = totals[key] + value if key in totals else value
    except FloatingPointError as err:  # the MoE layer's check of its router logits
        cause = str(err).split(",")[0].split(";")[0]  # its first clause: what was not finite
        raise FloatingPointError(f"the run diverged at step {step + 1}: {cause}; {_NOT_SAVED}") from None
    ranks.sync_gradients(model)
    grad_norm = ranks.clip(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_budgets(model, ranks.sum_tensor)  # budgeted routers: t follows the step's experts/token
    return {key: value / cfg.grad_accum for key, value in totals.items()}, grad_norm, tokens


# --- the XMoE recipe (docs/method.md): the MoE loss terms, the optimizer and the schedule -----


def moe_objective(ce: Tensor, out: Any, cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss a task trains with, and its logs, from the task's cross entropy ``ce`` and the
    model output ``out`` (``aux_loss``, ``z_loss``, ``entropy_loss``: summed over MoE layers;
    ``stats``: one RoutingStats per layer):

        loss = ce + aux_loss_coef * (sum over MoE layers of l_aux) + z_loss_coef * (sum of z-losses)
                  + entropy_loss_coef * (sum of mean router entropies)

    The last two are options beyond the paper, off by default (docs/method.md, "Deviations").
    The logs stay on the device: the loop reads them at its log steps."""
    loss = (ce + cfg.aux_loss_coef * out.aux_loss + cfg.z_loss_coef * out.z_loss
            + cfg.entropy_loss_coef * out.entropy_loss)
    logs = {"loss": loss.detach(), "ce": ce.detach(), "aux_loss": out.aux_loss.detach(),
            "router_entropy": out.entropy_loss.detach()}
    if out.stats:
        logs["experts_per_token"] = torch.stack([s.kept_per_token for s in out.stats]).mean()
        logs["wanted_experts_per_token"] = torch.stack([s.wanted_per_token for s in out.stats]).mean()
        logs["dropped_token_fraction"] = torch.stack([s.dropped_token_fraction for s in out.stats]).mean()
    return loss, logs


BIASES = {"bias", "b1", "b2", "b3"}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings, as GPT-2
    setups do). ``router_lr_mult`` (beyond the paper, off at 1) puts the routers' gates in a
    group of their own whose learning rate is ``lr_mult`` times the schedule's; the loop sets
    ``lr * lr_mult`` per group."""
    decay, no_decay, router = [], [], []
    separate_router = cfg.router_lr_mult != 1.0  # else the paper's two groups, as older checkpoints hold
    seen = set()
    for _, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # Embeddings, biases (expert biases are [E, F]: 2-D, still biases) and norm gains
            # are not decayed.
            is_embedding = isinstance(module, nn.Embedding)
            if separate_router and isinstance(module, Router):
                router.append(param)
            else:
                (no_decay if is_embedding or param.ndim < 2 or name in BIASES else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if router:
        groups.append({"params": router, "weight_decay": cfg.weight_decay, "lr_mult": cfg.router_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay
    to ``lr * min_lr_ratio`` (LM), inverse square root (translation, Vaswani et al. 2017), or
    constant. Warm-up lasts ``warmup_steps`` when set (the translation recipe's 512), else
    ``warmup_fraction`` of the schedule's span, ``schedule_steps`` (default ``max_steps``); the
    cosine decays over that span, then stays at its floor."""
    span = cfg.schedule_steps or cfg.max_steps
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = max(1, round(cfg.warmup_fraction * span)) if cfg.warmup_fraction > 0 else 0
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / (step + 1))
    progress = (step - warmup) / max(1, span - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Unread:
    """The numbers of the steps since the last read, kept on the device, and the one read that
    brings them to the host (at log, evaluation and save steps, and at the end), as nanoGPT and
    torchtitan read only at their log interval.

    A step whose loss or gradient norm is not finite stops the run at that read, before any
    checkpoint holds it: the weights it updated are never saved (checkpoints also refuse
    non-finite weights, ``_check_finite``). Until that read the run goes on, on NaN numbers if a
    step diverged (the optimizer steps, a compute budget moves t): at most ``log_every`` steps,
    none of which reaches a checkpoint."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.steps: list[tuple[int, float, dict[str, Tensor], Tensor, int]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def add(self, step: int, lr: float, logs: dict[str, Tensor], grad_norm: Tensor, tokens: int) -> None:
        self.steps.append((step, lr, logs, grad_norm, tokens))

    def read(self, model: nn.Module | None) -> list[dict[str, Any]]:
        """One train row per unread step (with ``model``: the last row also holds the budgeted
        layers' t). Logs are averaged and tokens summed over the ranks, in one all-reduce."""
        if not self.steps:
            return []
        keys = list(self.steps[0][2])
        logs_SK = torch.stack([torch.stack([logs[k] for k in keys]) for _, _, logs, _, _ in self.steps]).double()
        tokens_S = torch.tensor([n for *_, n in self.steps], dtype=torch.float64, device=logs_SK.device)
        summed_SC = self.ranks.sum_tensor(torch.cat([logs_SK, tokens_S[:, None]], dim=1))
        norms_S = torch.stack([norm for _, _, _, norm, _ in self.steps]).to(summed_SC.device, torch.float64)
        table_SC = torch.cat([summed_SC, norms_S[:, None]], dim=1)  # per step: logs (summed), tokens, grad norm
        dials = budget_dials(model) if model is not None else []
        ts_L = [d.threshold.to(table_SC.device, torch.float64).reshape(1) for d in dials]
        flat = torch.cat([table_SC.flatten(), *ts_L]).tolist()  # the one read
        seconds = time.perf_counter() - self.started
        width = table_SC.shape[1]
        table = [flat[i * width:(i + 1) * width] for i in range(len(self.steps))]
        thresholds = flat[len(self.steps) * width:]
        rows = []
        for (step, lr, *_rest), (*values, _tokens, norm) in zip(self.steps, table):
            logs = {k: v / self.ranks.world_size for k, v in zip(keys, values)}
            rows.append({"step": step, "split": "train", "lr": lr, "grad_norm": norm, **logs})
            if not (math.isfinite(logs["loss"]) and math.isfinite(norm)):
                raise FloatingPointError(f"the run diverged at step {step}: loss {logs['loss']}, gradient norm "
                                         f"{norm}; {_NOT_SAVED}")
        rows[-1]["tokens_per_s"] = sum(tokens for *_, tokens, _norm in table) / seconds  # over the steps read
        if thresholds:
            rows[-1] |= {"threshold": sum(thresholds) / len(thresholds), "threshold_layers": thresholds}
        self.steps.clear()
        self.restart_clock()
        return rows


@contextlib.contextmanager
def _failing_together(ranks, run_dir: Path, cfg: TrainConfig, done: Callable[[], int]):
    """A collective that failed because another rank is gone (its process ended: noticed at
    once; it hangs: after train.collective_timeout_s) becomes a RanksLost on this rank that
    says so, where the run stood and what to resume from. Every rank stops, none hangs."""
    try:
        yield
    except RuntimeError as err:
        if ranks.world_size == 1 or isinstance(err, RanksLost) or not lost_contact(err):
            raise
        reason = str(err).split(". ")[0]
        raise RanksLost(
            f"rank {ranks.rank} lost contact with another rank during step {done() + 1}: a rank died or stopped "
            f"answering for train.collective_timeout_s={cfg.collective_timeout_s:g} s ({reason}). Every rank "
            f"stops; {_last_checkpoint(run_dir)}"
        ) from None


def _last_checkpoint(run_dir: Path) -> str:
    try:
        step = read_state(checkpoint_dir(run_dir))["step"]
    except CheckpointError:
        return f"no checkpoint was saved in {run_dir} yet"
    return f"the last checkpoint (step {step}) in {run_dir} is intact: continue with --out {run_dir} --resume"


def _stop_requested(stop: StopSignals, ranks) -> bool:
    """Whether any rank received a stop signal; every rank gets the same answer, so all stop
    after the same step and the collective save matches up (one small all-reduce when
    distributed; nothing in a single process)."""
    if ranks.sum(int(stop.signum is not None)):
        stop.request(signal.SIGINT)  # a rank that saw no signal stops with the others
        return True
    return False


_NOT_SAVED = "nothing was saved (the last checkpoint, if any, is unchanged). Train again with a lower train.lr"


def _check_finite(model: nn.Module, step: int, run_dir: Path, ranks) -> None:
    """Refuse to save weights that hold NaN or inf: a checkpoint must stay loadable. Each rank
    checks its own shards; all refuse together."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(local(t)).all()]
    if ranks.sum(len(bad)):
        bad = bad or ["on another rank"]
        raise FloatingPointError(
            f"the run diverged by step {step}: the weights hold NaN or inf ({', '.join(bad[:3])}); not saved, "
            f"the last checkpoint in {run_dir} is unchanged. Lower train.lr and resume from it, or start again"
        )


def _evaluate(model: nn.Module, task: Task, ranks: Ranks) -> dict[str, Any]:
    metrics = task.evaluate(model, ranks)  # the task sets eval mode, no_grad and precision
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


__all__ = ["Task", "TrainResult", "autocast_context", "build_optimizer", "lr_at", "moe_objective", "resolve_device",
           "train"]
