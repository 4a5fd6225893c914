"""Measure one trained study run, in the process that trained it (xmoe.study.runner).

Measured per run (XMoE, Yang et al. 2024, Sec. 4: perplexity at equal parameters and the MoE
computation; docs/method.md "Statistics"):

    perplexity            exp(token-mean CE) on the first ``train.eval_batches`` validation
                          batches, dropless (eval_capacity_factor None), as `xmoe eval`
    experts per token     per MoE layer, kept (= wanted when dropless), on the same batches
    MoE FLOPs per token   ``moe_flops_per_token(cfg, per-layer experts/token)``, and the top-k
                          budget ``flops_breakdown(cfg).experts`` it is compared with
    dropped pairs         evaluating again with the training capacity (factor 8): the pairs
                          capacity drops, and the fraction of training tokens that lost a pair
                          (metrics.jsonl)
    training tokens/s     median of the per-step rates in metrics.jsonl (the first step left out)
    inference tokens/s    a timed dropless evaluation pass (best of ``repeats``, after a warm-up
                          batch) in this process, batches prepared beforehand
    test                  the same numbers on the held-out test split, when the run has one
                          (data.test_fraction > 0)

``measurements.json`` in the run folder, written last and atomically, marks a finished run; a
study skips such runs when it resumes (``read_measurements`` checks them against the plan).
``sweep_run`` is a run's threshold sweep as `xmoe sweep-threshold` and the demo's dial write it
(xmoe.sweep); ``inference_sweep`` the study's per-seed version, with timing and per-layer numbers
for its tables.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from xmoe.checkpoints import set_threshold, training_capacity
from xmoe.errors import UsageError
from xmoe.models.gpt import flops_breakdown, num_params
from xmoe.sweep import point_from_eval, sweep, write_sweep
from xmoe.tasks.lm import LMEval, LMRunConfig, eval_batches, evaluate_lm, load_lm
from xmoe.training import LoadedRun, checkpoint_dir, from_dict, read_metrics, to_dict

MEASUREMENTS = "measurements.json"
INFERENCE_SWEEP = "inference_sweep.json"
TIMING_REPEATS = 2


def is_finished(run_dir: Path) -> bool:
    return (run_dir / MEASUREMENTS).is_file()


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write atomically: a crash leaves the old file (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def planned_config(cfg: LMRunConfig) -> dict:
    """The config a run was planned with, as saved in measurements.json (the vocabulary is the
    tokenizer's, so it is left out of the comparison on resume)."""
    data = json.loads(json.dumps(to_dict(cfg)))  # as read back from JSON (tuples become lists)
    data["model"].pop("vocab_size")
    return data


def _same_config(saved: dict, cfg: LMRunConfig) -> bool:
    """Whether a finished run's saved config is ``cfg``; fields added to the configs since it ran
    take their defaults (rebuilding the saved config fills them in)."""
    saved = json.loads(json.dumps(saved))
    saved["model"]["vocab_size"] = cfg.model.vocab_size
    return planned_config(from_dict(LMRunConfig, saved)) == planned_config(cfg)


STUDY_FLAGS = "this study plans (other --steps, --scale or --data?)"


def check_planned(saved: dict, cfg: LMRunConfig, run_dir: Path, planned: str = STUDY_FLAGS) -> None:
    """Refuse the run in ``run_dir``, saved with config ``saved``, unless it is the run ``cfg``
    plans; ``planned`` says whose plan and which flags make another one."""
    if not _same_config(saved, cfg):
        raise UsageError(f"{run_dir} holds a run with another config than {planned}; use another --out, or "
                         f"delete {run_dir}")


def read_measurements(cfg: LMRunConfig, run_dir: Path, planned: str = STUDY_FLAGS) -> dict:
    """A finished run's measurements.json, refused when the run was trained with another config."""
    done = read_json(run_dir / MEASUREMENTS)
    check_planned(done["config"], cfg, run_dir, planned)
    return done


def measure_run(cfg: LMRunConfig, run_dir: Path, *, training: dict) -> dict:
    """Measure the trained run in ``run_dir`` and write measurements.json; ``training``: what the
    runner recorded while training it (seconds, the step it resumed from, the load average)."""
    loaded = load_lm(run_dir, device=cfg.train.device)
    batches = list(eval_batches(loaded, None, max_batches=cfg.train.eval_batches))
    dropless, infer_tps = timed_eval(loaded.model, batches, precision=cfg.train.precision)
    result = {
        "config": planned_config(cfg),
        "preset": cfg.preset,
        "params": num_params(loaded.model),
        "steps": cfg.train.max_steps,
        "tokens_trained": cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len,
        **training,
        "torch_threads": torch.get_num_threads(),
        "forward_flops_per_token_budget": flops_breakdown(loaded.model.cfg).total,
        "inference_tokens_per_s": infer_tps,
        **_eval_numbers(dropless),
        **training_numbers(read_metrics(run_dir / "metrics.jsonl")),
    }
    if cfg.data.test_fraction > 0:  # the held-out split: reported, never used to choose
        test_batches = eval_batches(loaded, None, max_batches=cfg.train.eval_batches, split="test")
        result["test"] = _eval_numbers(evaluate_lm(loaded.model, test_batches, precision=cfg.train.precision))
    if loaded.model.cfg.moe is not None:
        with training_capacity(loaded.model):
            capped = evaluate_lm(loaded.model, batches, precision=cfg.train.precision).to_dict()
        result["capacity_eval"] = {
            "perplexity": capped["perplexity"],
            "experts_per_token_layers": [l["experts_per_token"] for l in capped["layers"]],
            "dropped_pairs_layers": [l["dropped_pairs"] for l in capped["layers"]],
            "dropped_pairs_per_token": sum(l["dropped_pairs"] for l in capped["layers"]) / capped["tokens"],
        }
    write_json(run_dir / MEASUREMENTS, result)
    return result


def timed_eval(model, batches: list, *, precision: str = "auto", repeats: int = TIMING_REPEATS) -> tuple[LMEval, float]:
    """The evaluation of ``batches`` and its speed in tokens/s (best of ``repeats`` passes after
    one warm-up batch: the machine is shared, so the fastest pass is the least disturbed)."""
    evaluate_lm(model, batches[:1], precision=precision)
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = evaluate_lm(model, batches, precision=precision)
        best = min(best, time.perf_counter() - t0)
    return result, result.tokens / best


def _eval_numbers(ev: LMEval) -> dict:
    """Perplexity and routing of a dropless evaluation, the per-layer lists kept."""
    d = ev.to_dict()
    out = {"loss": d["loss"], "perplexity": d["perplexity"], "eval_tokens": d["tokens"]}
    if "layers" in d:
        out.update(
            experts_per_token=d["experts_per_token"],
            experts_per_token_layers=[l["experts_per_token"] for l in d["layers"]],
            top1_median_layers=[l["top1_quartiles"][1] for l in d["layers"]],
            moe_flops_per_token=d["moe_flops_per_token"],
            topk_moe_flops_per_token=d["topk_moe_flops_per_token"],
            moe_flops_ratio=d["moe_flops_ratio"],
        )
    return out


def training_numbers(rows: list[dict], *, tail: float = 0.1) -> dict:
    """Training speed (median tokens/s, the first step left out: it pays for warm-up) and, over
    the last ``tail`` of the logged steps, experts per token and the fraction of tokens that
    lost a pair to capacity."""
    train = [r for r in rows if r.get("split") == "train"]
    if not train:
        raise UsageError("metrics.jsonl has no training rows; the run did not train")
    steady = train[1:] or train
    last = train[-max(1, round(len(train) * tail)):]
    out = {"train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
           "final_train_ce": statistics.fmean(r["ce"] for r in last)}
    if "experts_per_token" in train[0]:
        out["train_experts_per_token"] = statistics.fmean(r["experts_per_token"] for r in last)
        out["train_dropped_token_fraction"] = statistics.fmean(r["dropped_token_fraction"] for r in last)
    return out


def inference_sweep(cfg: LMRunConfig, run_dir: Path, thresholds: tuple[float, ...], *,
                    split: str = "val") -> list[dict]:
    """The trained model of ``run_dir`` at each threshold (xmoe.sweep points: dropless, timed) on
    its validation (or test) split, as JSON rows; cached in inference_sweep.json
    (inference_sweep_test.json), measured again if the thresholds differ or the file predates
    the sweep's point (no tokens_per_second)."""
    path = Path(run_dir) / (INFERENCE_SWEEP if split == "val" else INFERENCE_SWEEP.replace(".json", f"_{split}.json"))
    if path.is_file():
        rows = read_json(path)
        if [r["threshold"] for r in rows] == list(thresholds) and all("tokens_per_second" in r for r in rows):
            return rows
    loaded = load_lm(run_dir, device=cfg.train.device)
    batches = list(eval_batches(loaded, None, max_batches=cfg.train.eval_batches, split=split))

    def measure():
        ev, speed = timed_eval(loaded.model, batches, precision=cfg.train.precision, repeats=1)
        return point_from_eval(ev.to_dict(), None, tokens_per_second=speed)

    points = sweep(thresholds, measure, lambda t: set_threshold(loaded.model, t, run_dir))
    rows = [p.to_dict() for p in points]
    write_json(path, rows)
    return rows


def sweep_run(loaded: LoadedRun, thresholds: list[float], batches, out: Path, *, data: str | None = None) -> None:
    """An `xmoe train` run's threshold sweep (xmoe.sweep), measured as `xmoe eval` measures, into
    its report folder ``out`` (threshold_sweep.*, or threshold_sweep_<stem>.* on other text;
    the JSON names the text and the checkpoint's step)."""
    from xmoe.training.checkpoint import read_state
    from xmoe.report import is_dense_split

    if loaded.model.cfg.moe is None or loaded.model.cfg.moe.router != "threshold":
        raise UsageError(f"{loaded.run_dir} has no threshold router to sweep (preset {loaded.cfg.preset})")
    points = sweep(thresholds, lambda: point_from_eval(evaluate_lm(loaded.model, batches).to_dict(), None),
                   lambda t: set_threshold(loaded.model, t, loaded.run_dir))
    write_sweep(points, out, data=data, step=read_state(checkpoint_dir(loaded.run_dir))["step"],
                baseline="dense" if is_dense_split(loaded.model.cfg.moe) else "top-k")
