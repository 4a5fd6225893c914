"""The router-sharpening study: can XMoE's threshold router become confident within 1,000 steps?

After a short run the router is nearly uniform, so at t = 0.9 a token engages many experts and
XMoE costs more than top-k; the paper's saving comes after 60k steps (docs/results.md). This
study trains the paper's recipe, each sharpening option of ``TrainConfig`` (beyond the paper,
docs/method.md "Deviations") and top-k at equal parameters, on one corpus, and asks whether an
option reaches **the bar**: XMoE at t = 0.9 using at most 0.5x top-k's expert FLOPs at a test
perplexity within top-k's seed spread (mean <= top-k's mean + its std), within 1,000 steps.

The protocol, fixed before any run:

    splits    train | validation (5% of the characters) | test (the last 5%), data.test_fraction
    models    XMoE 64 experts x 64 at t = 0.9 and top-k 64 x 64 (k = 8), the CPU family shrunk to
              d_model 128 (the `cpu` study scale); 1,000 steps of 8 x 64 tokens, lr 2e-3
    arms      paper      the paper's recipe
              entropy-C  + C x router entropy (top-p routing's dynamic loss), C in ENTROPY_COEFS
              lr-xM      the routers' learning rate times M, M in ROUTER_LR_MULTS
              topk       the top-k model
    stage 1   every arm, seed 0
    select    per option, on VALIDATION: of its values whose FLOPs ratio at t = 0.9 is <= 0.5,
              the one of lowest validation perplexity; if none is, the one of lowest FLOPs ratio
    stage 2   paper, topk and each option's chosen value, seeds 1 .. seeds-1
    report    on the TEST split, which no choice looked at: perplexity (mean ± std over seeds),
              experts per token, FLOPs vs top-k, training and inference tokens/s of the same
              runs, the inference threshold sweep, experts per token over training

    xmoe study sharpen --data input.txt --out runs/sharpen/tinyshakespeare
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from xmoe.errors import check_counts
from xmoe.report.plots import figure, save
from xmoe.training import read_metrics

from .aggregate import mean_std, spread_cell, summarize
from .arms import ARM_FLAGS, Arm, heading, preflight, settings, spec, study_overrides, write_results
from .measure import inference_sweep, read_json
from .plan import INFERENCE_THRESHOLDS
from .plots import STUDY_DPI
from .runner import Runner

ENTROPY_COEFS = (0.03, 0.1, 0.3)
ROUTER_LR_MULTS = (3.0, 10.0)
BAR_FLOPS_RATIO = 0.5

PAPER = Arm(name="paper")
TOPK = Arm(name="topk", router="topk")
OPTION_ARMS = (
    *(Arm(name=f"entropy-{c:g}", option="entropy", overrides={"train.entropy_loss_coef": f"{c:g}"})
      for c in ENTROPY_COEFS),
    *(Arm(name=f"lr-x{m:g}", option="router_lr", overrides={"train.router_lr_mult": f"{m:g}"})
      for m in ROUTER_LR_MULTS),
)
ARMS = (PAPER, *OPTION_ARMS, TOPK)
# What tells the arms apart, seeds apart and test from validation: the study sets these itself.
FIXED = ("train.entropy_loss_coef", "train.router_lr_mult", "train.seed", "model.moe.router", "data.test_fraction",
         "data.val_fraction")


def select(arms: list[Arm], measured: dict[str, dict]) -> Arm:
    """The pre-declared choice among one option's values, from their seed-0 validation numbers."""
    cheap = [a for a in arms if measured[a.name]["moe_flops_ratio"] <= BAR_FLOPS_RATIO]
    if cheap:
        return min(cheap, key=lambda a: measured[a.name]["perplexity"])
    return min(arms, key=lambda a: measured[a.name]["moe_flops_ratio"])


def run_sharpen(*, out: str | os.PathLike, data: str | None = None, seeds: int = 3, steps: int | None = None,
                overrides: dict[str, str] | None = None, progress: bool = False,
                log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study in ``out``; write results.json, results.md and the plots."""
    check_counts("study", seeds=seeds)
    extra = study_overrides("sharpen", FIXED, steps=steps, data=data, overrides=overrides)
    preflight(ARMS, extra, data=data)
    out = Path(out)
    runner = Runner(out / "runs", progress=progress, log=log, planned=ARM_FLAGS)

    def measure(arm: Arm, seed: int) -> dict:
        s = spec(arm, seed, extra)
        m = runner.measure(s)
        if arm.router == "threshold":
            inference_sweep(s.config(), runner.run_dir(s), INFERENCE_THRESHOLDS, split="test")
        return m

    first = {arm.name: measure(arm, 0) for arm in ARMS}
    chosen = {option: select([a for a in OPTION_ARMS if a.option == option], first)
              for option in ("entropy", "router_lr")}
    final_arms = (PAPER, *chosen.values(), TOPK)
    log("chosen on validation: " + ", ".join(a.name for a in chosen.values()))
    for seed in range(1, seeds):
        for arm in final_arms:
            measure(arm, seed)
    results = collect(out, extra, first, chosen, final_arms, seeds)
    write_results(results, out, markdown, draw)
    log(f"done in {runner.elapsed()}: {out / 'results.md'}")
    return results


def collect(out: Path, extra: dict[str, str], first: dict[str, dict], chosen: dict[str, Arm],
            final_arms: tuple[Arm, ...], seeds: int) -> dict:
    """Stage 1 on validation, and the final arms on test, seed means and spreads."""
    def runs(arm: Arm) -> list[dict]:
        return [read_json(out / "runs" / f"{arm.name}-s{s}" / "measurements.json") for s in range(seeds)]

    def sweep(arm: Arm) -> list[dict]:
        per_seed = [read_json(out / "runs" / f"{arm.name}-s{s}" / "inference_sweep_test.json") for s in range(seeds)]
        return [summarize(f"t={t:g}", [rows[i] for rows in per_seed], threshold=t)
                for i, t in enumerate(INFERENCE_THRESHOLDS)]

    final = []
    for arm in final_arms:
        row = summarize(arm.name, [m["test"] | _speeds(m) for m in runs(arm)])
        row["option"] = arm.option
        if arm.router == "threshold":
            row["sweep"] = sweep(arm)
        final.append(row)
    topk = final[-1]
    for row in final[:-1]:
        row["meets_bar"] = meets_bar(row, topk)
    return {
        **settings("sharpen", extra, seeds),
        "stage1": [{"arm": a.name, "option": a.option, "chosen": a in chosen.values(), **_stage1(first[a.name])}
                   for a in ARMS],
        "final": final,
        "runs": [f"{a.name}-s{s}" for a in final_arms for s in range(seeds)],
    }


def meets_bar(row: dict, topk: dict) -> bool:
    """FLOPs at most 0.5x top-k's and test perplexity within top-k's seed spread (or better)."""
    spread = topk["perplexity"]["std"] or 0.0
    return (row["moe_flops_ratio"]["mean"] <= BAR_FLOPS_RATIO
            and row["perplexity"]["mean"] <= topk["perplexity"]["mean"] + spread)


def _speeds(m: dict) -> dict:
    return {k: m[k] for k in ("train_tokens_per_s", "inference_tokens_per_s", "train_seconds")}


def _stage1(m: dict) -> dict:
    return {"val_perplexity": m["perplexity"], "experts_per_token": m["experts_per_token"],
            "moe_flops_ratio": m["moe_flops_ratio"],
            "top1_median": sum(m["top1_median_layers"]) / len(m["top1_median_layers"])}


def markdown(results: dict) -> str:
    lines = [*heading("Router sharpening", results),
             "## Stage 1: every arm, seed 0, validation split (the choice)", "",
             "| arm | val PPL | experts/token (t = 0.9) | FLOPs vs top-k | median top-1 p | chosen |",
             "|---|---|---|---|---|---|"]
    for r in results["stage1"]:
        lines.append(f"| {r['arm']} | {r['val_perplexity']:.2f} | {r['experts_per_token']:.2f} | "
                     f"{r['moe_flops_ratio']:.2f}x | {r['top1_median']:.3f} | {'yes' if r['chosen'] else ''} |")
    lines += ["", f"## Final: test split, {len(results['seeds'])} seeds (mean ± std)", "",
              "| arm | test PPL | experts/token | FLOPs vs top-k | train tok/s | inference tok/s | meets the bar |",
              "|---|---|---|---|---|---|---|"]
    for r in results["final"]:
        bar = {True: "**yes**", False: "no", None: "(reference)"}[r.get("meets_bar")]
        lines.append(f"| {r['label']} | {spread_cell(r['perplexity'])} | {spread_cell(r['experts_per_token'])} | "
                     f"{spread_cell(r['moe_flops_ratio'])}x | {spread_cell(r['train_tokens_per_s'], '.0f')} | "
                     f"{spread_cell(r['inference_tokens_per_s'], '.0f')} | {bar} |")
    lines += ["", "## Threshold sweep at inference (test split; experts/token, FLOPs vs top-k, PPL)", ""]
    rows = [r for r in results["final"] if "sweep" in r]
    lines += ["| t | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for i, t in enumerate(INFERENCE_THRESHOLDS):
        cells = [f"{s['experts_per_token']['mean']:.1f}, {s['moe_flops_ratio']['mean']:.2f}x, "
                 f"{s['perplexity']['mean']:.2f}" for s in (r["sweep"][i] for r in rows)]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![{p}]({p})" for p in results.get("plots", [])), ""]
    return "\n".join(lines)


def draw(results: dict, out: Path) -> list[str]:
    """sharpen.png: experts per token over training (what the router wants, before capacity),
    and test perplexity against FLOPs vs top-k."""
    fig, axes = figure(1, 2, panel=(5.6, 4.2), extra="study")
    ax_steps, ax_cost = axes[0]
    for row in results["final"]:
        curves = [[r for r in read_metrics(out / "runs" / f"{row['label']}-s{s}" / "metrics.jsonl")
                   if r.get("split") == "train"] for s in results["seeds"]]
        steps = [r["step"] for r in curves[0]]
        wanted = [mean_std([c[i]["wanted_experts_per_token"] for c in curves])["mean"] for i in range(len(steps))]
        ax_steps.plot(steps, wanted, label=row["label"], linewidth=1)
        ax_cost.errorbar(row["moe_flops_ratio"]["mean"], row["perplexity"]["mean"],
                         xerr=row["moe_flops_ratio"]["std"] or 0, yerr=row["perplexity"]["std"] or 0,
                         fmt="s" if row["label"] == "topk" else "o", capsize=3, label=row["label"])
    ax_steps.set(xlabel="step", ylabel="experts/token wanted (mean of layers, seeds)",
                 title="Experts per token over training", yscale="log")
    ax_cost.axvline(BAR_FLOPS_RATIO, color="tab:red", linestyle=":", linewidth=1)
    ax_cost.set(xlabel="MoE FLOPs / top-k's (t = 0.9, dropless, test)", ylabel="test perplexity (mean ± std)",
                title="Quality against compute")
    for ax in (ax_steps, ax_cost):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, out / "sharpen.png", dpi=STUDY_DPI)
    return ["sharpen.png"]
