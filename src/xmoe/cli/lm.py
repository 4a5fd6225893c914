"""The language-model commands: `xmoe demo / train / eval / sweep-threshold / generate / report /
presets`. Each is a typed function whose signature is its flags (xmoe.cli.main); the work
lives in the library. eval, sweep-threshold and generate open any kind of checkpoint
(xmoe.checkpoints): an `xmoe train` run here, a Hugging Face folder or Hub id in xmoe.cli.hf.

`xmoe train --nproc N` re-runs the command under torchrun, and a process that torchrun started
joins the run (xmoe.distributed.init_from_env):

    xmoe train --nproc 2 --ep-size 2 --preset cpu-xmoe-64x128 --out runs/ep
    torchrun --nproc-per-node 2 -m xmoe train --ep-size 2 --preset cpu-xmoe-64x128 --out runs/ep
"""

from __future__ import annotations

import contextlib
import json as _json  # `json` is also a flag of `xmoe eval`
import os
import signal
import subprocess
import sys
from pathlib import Path

from xmoe.errors import UsageError

DEFAULT_THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


def presets() -> None:
    """List model presets with parameters and FLOPs."""
    from xmoe.presets import list_mt_presets, list_presets

    for title, rows in (("language-model presets (xmoe train --preset P)", list_presets()),
                        ("translation presets (xmoe train-mt --preset P)", list_mt_presets())):
        print(f"{title}:\n")
        print("| preset | layers | experts | params | forward GFLOPs/token | MoE expert MFLOPs/token (top-k budget) |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            forward = "" if row.flops_per_token is None else f"{row.flops_per_token / 1e9:.3f}"
            print(f"| {row.name} | {row.layers} | {row.experts} | {row.params / 1e6:.1f}M | {forward} "
                  f"| {row.moe_flops_per_token / 1e6:.1f} |")
        print()


def train(*, out: str, preset: str | None = None, resume: bool = False, nproc: int = 1, ep_size: int = 1,
          config: dict[str, str], command_line: list[str]) -> None:
    """Train a GPT preset; --section.field=value flags set its run config.

    Args:
        out: run folder: checkpoint, tokenizer, metrics, report
        preset: see `xmoe presets` (default: cpu-xmoe-64x128; with --resume: the run's)
        resume: continue the run in --out exactly where it stopped
        nproc: processes on this machine (launched with torchrun; gloo on CPU, NCCL on GPUs)
        ep_size: expert-parallel group size: each rank holds E/ep-size experts of every MoE layer
            (1 = experts replicated, pure data parallelism)
    """
    from xmoe.tasks.lm import LanguageModelling
    from xmoe.training.runs import run_config

    if nproc != 1 and not under_torchrun():
        sys.exit(relaunch(command_line, nproc))
    cfg = run_config(LanguageModelling, preset, config, resume_from=out if resume else None)
    train_and_report(cfg, Path(out), resume=resume, ep_size=ep_size)


def train_and_report(cfg, out: Path, *, resume: bool = False, ep_size: int = 1, go_on: str | None = None) -> None:
    """Train the language model ``cfg`` into ``out`` (on every rank under torchrun), then print
    its evaluation and write its report; ``go_on``: the command that continues it, if stopped,
    when it is not ``xmoe train --out OUT --resume``."""
    from xmoe.tasks.lm import train_lm
    from xmoe.training.stopping import exit_if_interrupted

    with parallel_context(ep_size, cfg.train) as parallel:
        main_rank = parallel is None or parallel.is_main
        if main_rank:
            ranks = "" if parallel is None else f" on {parallel.world_size} ranks (ep {ep_size})"
            print(f"training {cfg.preset} on {cfg.data.path or 'the default corpus'}{ranks} -> {out}")
        result = train_lm(cfg, out, resume=resume, ranks=parallel)
    if not main_rank:
        return
    if go_on is None and parallel is not None:  # the same processes and layout continue it
        go_on = f"xmoe train --nproc {parallel.world_size} --ep-size {ep_size} --out {out} --resume"
    exit_if_interrupted(result, cfg.train.max_steps, out, train="xmoe train", evaluate="xmoe eval", resume=go_on)
    from xmoe.report import describe_eval, write_report
    from xmoe.training.metrics import METRICS_FILE, read_metrics

    train_rows = [row for row in read_metrics(out / METRICS_FILE) if row.get("split") == "train"]
    print(describe_eval(result.final_eval, cfg.model.moe, sharpened=cfg.train.entropy_loss_coef > 0,
                        last_train=train_rows[-1] if train_rows else None))
    print(f"report: {write_report(out)}")


# --- `xmoe train --nproc N`: the run under torchrun -------------------------------------------


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(command_line: list[str], nproc: int) -> int:
    """Run this same `xmoe` command (its arguments: ``command_line``) under torchrun with
    ``nproc`` processes; its exit code."""
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "xmoe.cli.torchrun", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "xmoe", *_without_nproc(command_line)]
    print("launching:", " ".join(command), flush=True)
    # torchrun and its ranks in a process group of their own: a stop reaches them once, from here.
    return wait_forwarding_signals(subprocess.Popen(command, start_new_session=True))


def wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for ``proc``, the leader of its own process group, passing SIGINT and SIGTERM on to
    the whole group (torchrun and every rank), so that the ranks stop together after their
    coordinated save. Returns the exit status: 128 + the first signal (130, 143) if one came,
    as for a process that signal stopped; otherwise ``proc``'s."""
    from xmoe.training.stopping import STOP_SIGNALS, exit_code

    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):  # the group has just ended
            os.killpg(proc.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        status = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_code(received[0]) if received else status


@contextlib.contextmanager
def parallel_context(ep_size: int, train):
    """The Parallel of this rank under torchrun (None in a plain single process), set up from the
    run's ``train`` config (train.device: auto, cpu, cuda; its collective timeout)."""
    if not under_torchrun():
        if ep_size != 1:
            raise UsageError(f"--ep-size {ep_size} needs several processes: add --nproc N, or launch with torchrun")
        yield None
        return
    import torch.distributed as dist

    from xmoe.distributed import init_from_env

    parallel, _ = init_from_env(ep_size, train.device, timeout_s=train.collective_timeout_s)
    try:
        yield parallel
    finally:
        dist.destroy_process_group()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


# --- using a trained model --------------------------------------------------------------------


def evaluate(*, checkpoint: str, data: str | None = None, max_batches: int | None = None, capacity: bool = False,
             device: str = "auto", threshold: float | None = None, json: bool = False,
             max_experts: int | None = None) -> None:
    """Perplexity, experts per token and MoE FLOPs of a checkpoint.

    Args:
        checkpoint: run folder (or its checkpoint folder), Hugging Face folder, or Hub id ORG/NAME
        data: evaluate on this text instead of the run's validation split
        max_batches: at most this many batches (default: all of a run's text; 8 for a Hugging Face folder)
        capacity: apply the training capacity (default: dropless, so no token depends on its neighbours)
        threshold: change t at inference
        json: print the full result as JSON
        max_experts: Hugging Face MoE folders: at most this many experts per token under --threshold
    """
    from xmoe.cli import hf

    _check_max_batches(max_batches)
    opened = _open(checkpoint, "eval", takes=("run", "hf", "hub"))
    if opened.is_hugging_face:
        return hf.evaluate(opened, data=data, max_batches=max_batches, capacity=capacity, device=device,
                           threshold=threshold, json_out=json, max_experts=max_experts)
    from xmoe.checkpoints import training_capacity
    from xmoe.tasks.lm import eval_batches, evaluate_lm

    loaded = load_run(opened, device=device, threshold=threshold, capacity=capacity, max_experts=max_experts)
    with training_capacity(loaded.model) if capacity else contextlib.nullcontext():
        summary = evaluate_lm(loaded.model, eval_batches(loaded, data, max_batches=max_batches)).to_dict()
    if json:
        print(_json.dumps({"data": "the validation text" if data is None else repr(data), **summary}, indent=2))
        return
    from xmoe.report import describe_eval

    print(describe_eval(summary, loaded.model.cfg.moe, on=None if data is None else repr(data)))


def sweep_threshold(*, checkpoint: str, data: str | None = None, max_batches: int | None = None,
                    capacity: bool = False, device: str = "auto", thresholds: list[float] = DEFAULT_THRESHOLDS,
                    out: str | None = None, max_experts: int | None = None) -> None:
    """Perplexity and MoE FLOPs for several thresholds.

    Args:
        checkpoint: run folder (or its checkpoint folder), converted or Hugging Face folder, or Hub id ORG/NAME
        data: evaluate on this text instead of the run's validation split
        max_batches: at most this many batches (default: all of a run's text; 8 for a Hugging Face folder)
        capacity: apply the training capacity (default: dropless, so no token depends on its neighbours)
        out: default: RUN/report for an xmoe run; the current folder for a Hugging Face or converted
            model (never the model's folder)
        max_experts: Hugging Face MoE folders: at most this many experts per token under --thresholds
    """
    from xmoe.cli import hf

    _check_max_batches(max_batches)
    hf.check_thresholds(thresholds)
    opened = _open(checkpoint, "sweep-threshold", takes=("run", "converted", "hf", "hub"))
    if opened.kind == "converted" or opened.is_hugging_face:
        return hf.sweep_threshold(opened, data=data, max_batches=max_batches, capacity=capacity, device=device,
                                  thresholds=thresholds, out=out, max_experts=max_experts)
    from xmoe.checkpoints import training_capacity
    from xmoe.study.measure import sweep_run
    from xmoe.tasks.lm import eval_batches

    loaded = load_run(opened, device=device, capacity=capacity, max_experts=max_experts)
    with training_capacity(loaded.model) if capacity else contextlib.nullcontext():
        sweep_run(loaded, thresholds, eval_batches(loaded, data, max_batches=max_batches),
                  Path(out or Path(loaded.run_dir) / "report"), data=data)


def _check_max_batches(max_batches: int | None) -> None:
    """--max-batches, checked before loading (a Hugging Face folder took 0 for its default of 8)."""
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"--max-batches must be a positive number of batches, got {max_batches}")


def generate(*, checkpoint: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, threshold: float | None = None, seed: int = 0,
             device: str = "auto", max_experts: int | None = None) -> None:
    """Sample text from a checkpoint (KV cache); speed and experts per token to stderr.

    Args:
        checkpoint: run folder, Hugging Face folder, or Hub id ORG/NAME
        temperature: 0 = greedy
        threshold: change t at inference
        max_experts: Hugging Face MoE folders: at most this many experts per token under --threshold
    """
    from xmoe.cli import hf
    from xmoe.models.gpt import check_sampling

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_sampling(max_new_tokens, temperature, top_k, top_p, flags=True)
    opened = _open(checkpoint, "generate", takes=("run", "hf", "hub"))
    if opened.is_hugging_face:
        return hf.generate(opened, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, threshold=threshold, seed=seed, device=device,
                           max_experts=max_experts)
    import torch

    from xmoe.bench.decode import generation_report

    loaded = load_run(opened, device=device, threshold=threshold, max_experts=max_experts)
    ids = loaded.vocab.encode(prompt)
    if not ids:
        raise UsageError("--prompt is empty; give some text to continue")
    model = loaded.model
    on = next(model.parameters()).device
    with generation_report(model, max_new_tokens):
        out = model.generate(torch.tensor([ids], device=on), max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=torch.Generator(device=on).manual_seed(seed))
    print(loaded.vocab.decode(out[0].tolist()))


def report(run_dir: str, /, *, out: str | None = None) -> None:
    """Plots and a markdown summary of a run.

    Args:
        out: default: RUN/report
    """
    from xmoe.report import write_report

    print(f"report: {write_report(run_dir, out)}")


def demo(*, preset: str | None = None, steps: int | None = None, data: str | None = None, out: str = "runs/demo",
         paper_recipe: bool = False, resume: bool = False, command_line: list[str]) -> None:
    """The main job: train a CPU-sized XMoE LM, evaluate, report.

    Args:
        preset: an XMoE language-model preset (default: xmoe train's)
        steps: optimizer steps per model (default: the demo's, about 4 minutes on 2 cores for the three models)
        data: text file, folder or .jsonl (default: Python's own docs)
        out: runs/demo/xmoe and runs/demo/topK for each baseline k
        paper_recipe: train XMoE with the paper's fixed t = 0.9 (no budget controller); after a few hundred
            steps its router engages many experts, and the compute-matched top-k as many
        resume: continue a demo in --out that was stopped
    """
    from xmoe.study.demo import run_demo
    from xmoe.tasks.lm import LanguageModelling

    go_on = " ".join(["xmoe", *command_line, *([] if resume else ["--resume"])])
    run_demo(preset=preset or LanguageModelling.default_preset, steps=steps, data=data, out=out, paper_recipe=paper_recipe,
             resume=resume, go_on=go_on, train=train_and_report)


def _open(path: str, command: str, *, takes: tuple[str, ...]):
    """What ``path`` holds (xmoe.checkpoint_kind), refused unless ``command`` takes it."""
    from xmoe.checkpoints import checkpoint_kind, expect

    checkpoint = checkpoint_kind(path)
    expect(checkpoint, takes, command)
    return checkpoint


def load_run(checkpoint, *, device: str, threshold: float | None = None, capacity: bool = False,
             max_experts: int | None = None):
    """The `xmoe train` run at ``checkpoint`` with --threshold applied; --capacity is checked, and
    --max-experts refused (a run's cap is its config)."""
    from xmoe.checkpoints import has_capacity, open_checkpoint, set_threshold

    from xmoe.cli.hf import refuse_max_experts

    refuse_max_experts(checkpoint.path, max_experts, "an `xmoe train` run")
    loaded = open_checkpoint(checkpoint, device=device).run
    if threshold is not None:
        set_threshold(loaded.model, threshold, checkpoint.path)
    if capacity and not has_capacity(loaded.model):
        raise UsageError(f"--capacity: {checkpoint.path} was trained without capacity (dense or dropless)")
    return loaded
