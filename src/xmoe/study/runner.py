"""The experiment runner: every study and the demo train their runs through it.

A plan is a list of runs (``RunSpec``: a preset and its overrides, under a name). ``Runner``
trains each into ``folder/NAME`` once: a run trained to its last step is left as it is, an
interrupted one continues from its last checkpoint, so the same command run again resumes where
it stopped. A study measures each run after training it (``Runner.measure``); the demo
(xmoe.study.demo) evaluates its runs itself.

``run_study`` runs the paper's studies (xmoe.study.plan), then writes results.json, results.md
and the plots into the output folder:

    out/runs/NAME/        one run folder each (checkpoint, tokenizer, metrics.jsonl, measurements.json)
    out/results.json      every setting, every run's numbers, the aggregated tables
    out/results.md        the tables in markdown, with the plots
    out/*.png             main.png, threshold.png, granularity.png, loss_curves.png

The results are rewritten after every finished run, so an interrupted study still has tables
of what finished.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from xmoe.extras import check_extra
from xmoe.tasks.lm import train_lm
from xmoe.training import checkpoint_dir
from xmoe.training.checkpoint import read_config, read_state

from .aggregate import pairwise, summarize
from .measure import (INFERENCE_SWEEP, MEASUREMENTS, STUDY_FLAGS, check_planned, inference_sweep, is_finished,
                      measure_run, read_json, read_measurements, write_json, write_text)
from .plan import INFERENCE_THRESHOLDS, RunSpec, StudyPlan, Variant, plan_study
from .plots import write_plots
from .tables import results_markdown

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


@dataclass
class Runner:
    """Trains runs into ``folder`` and says what it does in ``log``. ``trainer(cfg, run_dir,
    resume=)`` trains one run to its last step; without one, ``train_lm`` trains it quietly (a
    progress bar with ``progress``) and a stop (Ctrl-C, SIGTERM) stops the plan."""

    folder: Path
    trainer: Callable[..., None] | None = None
    progress: bool = False
    log: Callable[[str], None] = print
    planned: str = STUDY_FLAGS  # whose plan, and the flags that would plan another run (for refusals)
    started: float = field(default_factory=time.time)

    def run_dir(self, spec: RunSpec) -> Path:
        return Path(self.folder) / spec.name

    def elapsed(self) -> str:
        return f"{(time.time() - self.started) / 60:.1f} min"

    def train(self, spec: RunSpec) -> int | None:
        """Train ``spec``'s run to its last step: from scratch, on from the checkpoint an
        interrupted run left, or not at all when it got there before. Returns the step its
        checkpoint was at (None: a fresh run)."""
        cfg, run_dir = spec.config(), self.run_dir(spec)
        step = read_state(checkpoint_dir(run_dir))["step"] if (run_dir / "checkpoint").exists() else None
        if step is not None:  # trained before, maybe with other flags: another run, not this one
            check_planned(read_config(run_dir), cfg, run_dir, self.planned)
        if step is not None and step >= cfg.train.max_steps:
            self.log(f"{run_dir}: trained before ({cfg.train.max_steps} steps)")
        elif self.trainer is not None:
            self.trainer(cfg, run_dir, resume=step is not None)
        elif train_lm(cfg, run_dir, resume=step is not None, progress=self.progress).interrupted:
            raise KeyboardInterrupt
        return step

    def measure(self, spec: RunSpec, position: str = "") -> dict:
        """Train ``spec``'s run and measure it (xmoe.study.measure); a run measured before is
        only checked against ``spec`` and read back. ``position``: "[i/n] " for the log."""
        run_dir = self.run_dir(spec)
        if is_finished(run_dir):
            measured = read_measurements(spec.config(), run_dir, self.planned)  # refuses a run of another config
            self.log(f"{position}{spec.name}: finished before, skipped")
            return measured
        self.log(f"{position}{spec.name}: training ({self.elapsed()} since start)")
        load, t0 = os.getloadavg()[0], time.perf_counter()
        resumed_at = self.train(spec)
        training = {"train_seconds": time.perf_counter() - t0, "resumed_at_step": resumed_at,
                    "load_average_before": load}
        m = measure_run(spec.config(), run_dir, training=training)
        self.log(f"    perplexity {m['perplexity']:.2f}, {m['train_seconds']:.0f} s, "
                 f"{m['train_tokens_per_s']:.0f} train tok/s, {m['inference_tokens_per_s']:.0f} inference tok/s"
                 + (f", {m['experts_per_token']:.2f} experts/token" if "experts_per_token" in m else ""))
        return m


def default_out(scale: str, data: str | None) -> Path:
    """``runs/study/SCALE-CORPUS``: CORPUS is ``default``, a folder's name, or a file's folder and stem."""
    if data is None:
        corpus = "default"
    else:
        p = Path(data).resolve()
        corpus = p.name if p.is_dir() else f"{p.parent.name}-{p.stem}".strip("-")
    return Path("runs") / "study" / f"{scale}-{corpus}"


def run_study(name: str, *, out: str | os.PathLike | None = None, data: str | None = None, seeds: int = 3,
              sweep_seeds: int = 1, scale: str = "cpu", steps: int | None = None,
              overrides: dict[str, str] | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Train and measure every run of study ``name`` that is not finished in ``out``; write the
    results after each run and at the end; return the results dict."""
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder; give a text file, a folder of "
                                f".txt/.md/.rst/.jsonl files, or a .jsonl file")
    plan = plan_study(name, scale=scale, seeds=seeds, sweep_seeds=sweep_seeds, steps=steps, data=data,
                      overrides=overrides)
    check_extra("study", "the study's plots")  # before any training, not at the first results
    out = Path(out) if out is not None else default_out(scale, data)
    runner = Runner(out / "runs", progress=progress, log=log)
    log(f"study {name} at scale {scale}: {len(plan.runs)} runs -> {out}")
    inference_runs = {plan.run(v, s).name for v in plan.inference_models for s in plan.sweep_seeds}
    for i, spec in enumerate(plan.runs, 1):
        runner.measure(spec, f"[{i}/{len(plan.runs)}] ")
        if spec.name in inference_runs:
            inference_sweep(spec.config(), runner.run_dir(spec), INFERENCE_THRESHOLDS)
        write_results(plan, out)
    log(f"done in {runner.elapsed()}: {out / RESULTS_MD}")
    return read_json(out / RESULTS_JSON)


def write_results(plan: StudyPlan, out: Path) -> dict:
    """Collect the finished runs of ``plan`` in ``out`` into results.json, results.md and plots."""
    results = collect(plan, out)
    write_json(out / RESULTS_JSON, results)
    results["plots"] = write_plots(results, out)
    write_json(out / RESULTS_JSON, results)
    write_text(out / RESULTS_MD, results_markdown(results))
    return results


def collect(plan: StudyPlan, out: Path) -> dict:
    """The results dict: settings, environment, every finished run, and the tables."""
    runs, missing = {}, []
    for spec in plan.runs:
        run_dir = out / "runs" / spec.name
        if not is_finished(run_dir):
            missing.append(spec.name)
            continue
        runs[spec.name] = {"label": spec.label, "seed": spec.seed, "preset": spec.preset,
                           "overrides": spec.overrides, "run_dir": f"runs/{spec.name}",
                           **read_json(run_dir / MEASUREMENTS)}
        if (run_dir / INFERENCE_SWEEP).is_file():
            runs[spec.name]["inference_sweep"] = read_json(run_dir / INFERENCE_SWEEP)
    results = {
        "study": plan.name,
        "scale": plan.scale.name,
        "scale_note": plan.scale.note,
        "data": plan.data or "default corpus (Python's reference docs and docstrings)",
        "seeds": list(plan.seeds),
        "sweep_seeds": list(plan.sweep_seeds),
        "common_overrides": plan.common_overrides(),
        "user_overrides": plan.extra_overrides,
        "environment": environment(),
        "missing_runs": missing,
        "runs": runs,
    }
    results.update(tables(plan, runs))
    return results


def tables(plan: StudyPlan, runs: dict[str, dict]) -> dict:
    """The study's tables from finished runs (rows whose runs have not finished are left out)."""
    def row(variant: Variant, seeds, **extra):
        finished = [runs[n] for n in (plan.run(variant, s).name for s in seeds) if n in runs]
        return summarize(variant.label(plan.scale.d_ff), finished, **extra) if finished else None

    out = {}
    if plan.main:
        rows = [r for r in (row(v, plan.seeds) for v in plan.main) if r]
        out["main"] = {"rows": rows, "pairs": pairwise(rows)}
    if plan.train_thresholds:
        rows = [row(v, plan.sweep_seeds, threshold=v.threshold) for v in plan.train_thresholds]
        out["threshold_train"] = {"rows": [r for r in rows if r]}
        out["threshold_inference"] = {"rows": _inference_rows(plan, runs)}
    if plan.granularity:
        rows = [row(v, plan.sweep_seeds, num_experts=v.num_experts,
                    expert_dim=8 * plan.scale.d_ff // v.num_experts) for v in plan.granularity]
        out["granularity"] = {"rows": [r for r in rows if r]}
    return out


def _inference_rows(plan: StudyPlan, runs: dict[str, dict]) -> list[dict]:
    """One row per inference threshold, averaged over the swept models (one per sweep seed)."""
    sweeps = [runs[n]["inference_sweep"] for n in
              (plan.run(v, s).name for v in plan.inference_models for s in plan.sweep_seeds)
              if n in runs and "inference_sweep" in runs[n]]
    rows = []
    for i, t in enumerate(INFERENCE_THRESHOLDS):
        if sweeps:
            rows.append(summarize(f"t={t:g}", [sweep[i] for sweep in sweeps], threshold=t))
    return rows


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
