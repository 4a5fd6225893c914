"""The compute-budget study: at the same average compute, is a threshold router better than top-k?

XMoE's claim is fewer expert FLOPs than top-k at equal quality (Yang et al., 2024, arXiv
2403.18926). A skeptic compares it with top-k over the same experts **at the same average
compute**, not only with the parameter-matched top-k of the paper. With a budget controller
(``MoEConfig.target_experts``, docs/method.md "A compute budget") XMoE's mean experts per token
is held at a chosen k̄ while each token still takes a variable number; this study sets XMoE at
k̄ against top-k at k = k̄ (and at the integers around a fractional k̄).

The protocol, fixed before any run:

    splits    train | validation (5% of the characters) | test (the last 5%), as `study sharpen`
    models    64 experts x 64 on the cpu-* family shrunk to d_model 128 (the study scale); every
              arm trains 1,000 steps of 8 x 64 tokens at lr 2e-3 unless --steps says otherwise
    arms      budget-1.5, budget-2, budget-4   XMoE, t steered to k̄ experts/token (t starts at 0.9)
              top1, top2, top4                 top-k over the same 64 experts
              references (after the core):     sharpen-0.03  XMoE t = 0.9 + 0.03 x router entropy
                                                             (the sharpening study's choice)
                                               paper         XMoE t = 0.9, the paper's recipe
    seeds     0, 1, 2: every core arm at seed 0, then at seed 1, then 2; then the references.
              Seed s fixes initialisation and batch order: within a seed, every arm sees the same
              tokens in the same order
    measured  on the WHOLE test split (no choice looks at it; nothing is chosen in this study):
              perplexity, experts per token per layer (dropless evaluation, t frozen at its
              trained value), the per-token distribution of experts, and whether it tracks
              difficulty: per layer, the Spearman rank correlation between a token's experts and
              its loss under the XMoE model, and its loss under the compute-matched top-k model
              of the same seed (the same tokens)
    speed     training and inference tokens/s of the seed-0 models, measured interleaved in one
              process after the runs (round robin over the arms, median of the repeats, one
              thread), so that a change of load cannot invert the comparison
    the bar   at some budget, XMoE's test perplexity beats the compute-matched top-k by more than
              the seed spread: mean + std below top-k's mean - std. Compute-matched: top-k at
              the nearest trained k at or above XMoE's measured test experts/token (the one that
              spends at least as much; within 0.05 of an integer k counts as k), and reported
              against the one below too. If no budget meets the bar, that is the result.
    length    1,000 steps, not the 3,000 the question deserves: 3 seeds x 8 arms x 2 corpora at
              1,000 steps is about 4 CPU-hours on the 2 shared cores this study was written on,
              the most one working session holds (`--steps 3000` runs it longer).

    xmoe study budget --data input.txt --out runs/budget/tinyshakespeare
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from xmoe.errors import UsageError, check_counts
from xmoe.report.plots import figure, save
from .compare import compute_matched_k

from .aggregate import mean_std, spread_cell
from .arms import ARM_FLAGS, EXPERTS, Arm, heading, preflight, settings, spec, study_overrides, write_results
from .measure import is_finished, read_json, write_json
from .plots import STUDY_DPI
from .runner import Runner

BUDGETS = (1.5, 2.0, 4.0)
TOPK = (1, 2, 4)
SHARPEN_COEF = 0.03
TOKENS_FILE = "test_tokens.safetensors"
SPEED_BATCHES = 4

BUDGET_ARMS = tuple(Arm(name=f"budget-{k:g}", option="budget", overrides={"model.moe.target_experts": f"{k:g}"})
                    for k in BUDGETS)
TOPK_ARMS = tuple(Arm(name=f"top{k}", router="topk", overrides={"model.moe.top_k": str(k)}) for k in TOPK)
CORE_ARMS = (*BUDGET_ARMS, *TOPK_ARMS)
REFERENCE_ARMS = (
    Arm(name=f"sharpen-{SHARPEN_COEF:g}", option="reference", overrides={"train.entropy_loss_coef": f"{SHARPEN_COEF:g}"}),
    Arm(name="paper", option="reference"),
)
ARMS = (*CORE_ARMS, *REFERENCE_ARMS)
# What tells the arms, seeds and splits apart: the study sets these itself.
FIXED = ("model.moe.target_experts", "model.moe.top_k", "train.entropy_loss_coef", "train.seed", "model.moe.router",
         "data.test_fraction", "data.val_fraction")


def arm_k(arm: Arm) -> float | None:
    """The arm's budget: k̄ of a budget arm, k of a top-k arm; None for a reference."""
    if arm.router == "topk":
        return float(arm.overrides["model.moe.top_k"])
    target = arm.overrides.get("model.moe.target_experts")
    return None if target is None else float(target)


# --- per-token analysis of the test split ---------------------------------------------------


def test_tokens(run_dir: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every token of the run's test split: its target id, its loss (nats) and the experts it
    took in each MoE layer (dropless, the trained t); cached in test_tokens.safetensors."""
    from safetensors.torch import load_file, save_file

    from xmoe.tasks.lm import eval_batches, load_lm

    path = Path(run_dir) / TOKENS_FILE
    if path.is_file():
        return load_file(path)
    loaded = load_lm(run_dir, device=device)
    model = loaded.model.eval()
    targets, losses, experts = [], [], []
    with torch.no_grad():
        for x_BL, y_BL in eval_batches(loaded, None, split="test"):
            out = model(x_BL.to(device))
            losses.append(F.cross_entropy(out.logits_BLV.float().flatten(0, 1), y_BL.flatten().to(device),
                                          reduction="none").cpu())
            targets.append(y_BL.flatten())
            experts.append(torch.stack([s.kept_T.cpu() for s in out.stats]).to(torch.int16))
    result = {"targets_N": torch.cat(targets).to(torch.int32), "loss_N": torch.cat(losses),
              "experts_LN": torch.cat(experts, dim=1)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another process may be writing it too
    save_file(result, str(tmp))
    os.replace(tmp, path)
    return result


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's on average ranks (ties share their mean rank).
    NaN when either side is constant (top-1's one expert for every token, say)."""
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first copy
    return (first + (counts - 1) / 2.0).double()[inverse]


def difficulty(own: dict, matched: dict | None) -> dict:
    """Per layer: Spearman of a token's experts against its loss under this model, and under the
    matched top-k model when given (same tokens); and the distribution of experts per token."""
    layers = []
    for experts_N in own["experts_LN"]:
        row = {"rho_own_loss": spearman(experts_N, own["loss_N"]),
               "histogram": torch.bincount(experts_N.long()).tolist()}
        if matched is not None:
            row["rho_topk_loss"] = spearman(experts_N, matched["loss_N"])
        layers.append(row)
    return {"layers": layers}


def measure_speeds(run_dirs: dict[str, Path], log: Callable[[str], None] = print) -> dict[str, dict]:
    """Training and inference tokens/s of each run's model, interleaved (compare.interleaved_speeds)
    on the first test batches; the load average is recorded beside them."""
    from xmoe.tasks.lm import eval_batches, load_lm
    from .compare import interleaved_speeds

    loaded = {name: load_lm(d, device="cpu") for name, d in run_dirs.items()}
    batches = list(eval_batches(next(iter(loaded.values())), None, split="test", max_batches=SPEED_BATCHES))
    speeds = interleaved_speeds({name: run.model for name, run in loaded.items()}, batches)
    load = os.getloadavg()[0]
    log(f"speeds measured interleaved (one thread, load average {load:.1f})")
    return {name: {**s, "load_average": load} for name, s in speeds.items()}


# --- the study ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    out: Path
    extra: dict[str, str]
    seeds: int
    arms: tuple[Arm, ...] = ARMS

    def run_dir(self, arm: Arm, seed: int) -> Path:
        return self.out / "runs" / f"{arm.name}-s{seed}"

    def finished(self, arm: Arm) -> list[int]:
        return [s for s in range(self.seeds) if is_finished(self.run_dir(arm, s))]


def run_budget(*, out: str | os.PathLike, data: str | None = None, seeds: int = 3, steps: int | None = None,
               overrides: dict[str, str] | None = None, progress: bool = False, train: bool = True,
               arms: tuple[Arm, ...] = ARMS, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study in ``out``, then write results.json, results.md and the plots.
    ``train=False`` tabulates the runs finished so far and trains nothing; ``arms`` (a subset
    of ARMS) is for tests."""
    check_counts("study", seeds=seeds)
    extra = study_overrides("budget", FIXED, steps=steps, data=data, overrides=overrides)
    preflight(arms, extra, data=data)
    study = Study(Path(out), extra, seeds, arms)
    runner = Runner(study.out / "runs", progress=progress, log=log, planned=ARM_FLAGS)
    if train:
        order = [(arm, s) for s in range(seeds) for arm in arms if arm.option != "reference"]
        order += [(arm, s) for s in range(seeds) for arm in arms if arm.option == "reference"]
        for arm, seed in order:
            s = spec(arm, seed, extra)
            runner.measure(s)
            test_tokens(runner.run_dir(s))
        speeds_path = study.out / "speeds.json"
        if not speeds_path.is_file():
            write_json(speeds_path, measure_speeds({a.name: study.run_dir(a, 0) for a in arms}, log=log))
    results = collect(study)
    write_results(results, study.out, markdown, draw)
    log(f"done in {runner.elapsed()}: {study.out / 'results.md'}")
    return results


def collect(study: Study) -> dict:
    """The finished runs, tabulated: per arm, test numbers over seeds (mean ± std), the per-token
    analysis, speeds, and each budget's verdict against the compute-matched top-k."""
    rows = {}
    for arm in study.arms:
        seeds = study.finished(arm)
        if seeds:
            rows[arm.name] = _arm_row(study, arm, seeds)
    if not rows:
        raise UsageError(f"{study.out} has no finished run of this study yet; run xmoe study budget with the "
                         f"same --out (and --data) first")
    speeds_path = study.out / "speeds.json"
    speeds = read_json(speeds_path) if speeds_path.is_file() else {}
    for name, row in rows.items():
        row["speed"] = speeds.get(name)
    topk = {row["k"]: row for row in rows.values() if row["router"] == "topk"}
    for row in rows.values():
        if row["option"] == "budget" or row["option"] == "reference":
            row["versus"] = versus(row, topk)
            row["difficulty"] = _difficulty(study, row, topk)
    return {
        **settings("budget", study.extra, study.seeds),
        "arms": list(rows.values()),
        "meets_bar": [r["label"] for r in rows.values() if r["option"] == "budget" and r["versus"].get("meets_bar")],
    }


def _arm_row(study: Study, arm: Arm, seeds: list[int]) -> dict:
    per_seed = [_test_numbers(study.run_dir(arm, s)) for s in seeds]
    row = {"label": arm.name, "router": arm.router, "option": arm.option, "k": arm_k(arm), "seeds": seeds}
    for key in ("perplexity", "experts_per_token", "final_threshold"):
        values = [p[key] for p in per_seed if p.get(key) is not None]
        row[key] = mean_std(values) if values else None
    row["experts_per_token_layers"] = [statistics.fmean(v) for v in zip(*(p["experts_layers"] for p in per_seed))]
    row["train_experts_per_token"] = mean_std([p["train_experts_per_token"] for p in per_seed])
    return row


def _test_numbers(run_dir: Path) -> dict:
    """Perplexity and experts/token on the whole test split, from the per-token file; the t each
    threshold-routed layer was left at by training (read from the checkpoint)."""
    from xmoe.tasks.lm import load_lm

    tokens = test_tokens(run_dir)
    m = read_json(run_dir / "measurements.json")
    experts_layers = tokens["experts_LN"].double().mean(dim=1).tolist()
    routers = [layer.router for layer in load_lm(run_dir, device="cpu").model.moe_layers()]
    thresholds = [r.threshold for r in routers if r.kind == "threshold"]
    return {"perplexity": math.exp(float(tokens["loss_N"].double().mean())),
            "experts_per_token": statistics.fmean(experts_layers), "experts_layers": experts_layers,
            "train_experts_per_token": m.get("train_experts_per_token", 0.0),
            "final_threshold": statistics.fmean(thresholds) if thresholds else None}


def matched_neighbours(measured: float, trained: list[float]) -> tuple[float | None, float | None]:
    """The trained top-k nearest below and at or above XMoE's measured experts per token, where
    "below" and "above" are those of ``compute_matched_k`` (the demo's rule): a measured 2.01
    is top-2's compute, not between top-2 and top-4."""
    ks = compute_matched_k(measured, EXPERTS)
    below = [k for k in trained if k <= min(ks)]
    above = [k for k in trained if k >= max(ks)]
    return (max(below) if below else None), (min(above) if above else None)


def versus(row: dict, topk: dict[float, dict]) -> dict:
    """XMoE's row against the trained top-k nearest below and at or above its measured experts
    per token (``matched_neighbours``): the differences of mean test perplexity, and whether
    each exceeds the spread."""
    measured = row["experts_per_token"]["mean"]
    out: dict = {"measured_experts": measured}
    for side, k in zip(("below", "above"), matched_neighbours(measured, list(topk))):
        if k is None:
            continue
        a, b = row["perplexity"], topk[k]["perplexity"]
        out[side] = {"k": k, "difference": a["mean"] - b["mean"], "better_beyond_spread": _beats(a, b),
                     "worse_beyond_spread": _beats(b, a), "paired": _paired(row, topk[k])}
    if "above" in out:
        out["meets_bar"] = bool(out["above"]["better_beyond_spread"])
    return out


def _paired(row: dict, other: dict) -> dict | None:
    """Per-seed differences of test perplexity (row's minus other's) over the seeds both ran:
    a seed fixes initialisation and batch order for every arm, so the pairs share their luck.
    Reported beside the bar, which compares the unpaired spreads."""
    values = dict(zip(other.get("seeds", []), other["perplexity"].get("values", [])))
    pairs = [v - values[s] for s, v in zip(row.get("seeds", []), row["perplexity"].get("values", [])) if s in values]
    return mean_std(pairs) if pairs else None


def _beats(a: dict, b: dict) -> bool | None:
    """Whether ``a``'s mean + std is below ``b``'s mean - std (None without spreads)."""
    if a["std"] is None or b["std"] is None:
        return None
    return a["mean"] + a["std"] < b["mean"] - b["std"]


def _difficulty(study: Study, row: dict, topk: dict[float, dict]) -> dict | None:
    """The per-token analysis of the row's seed-0 run, against the top-k at or above its experts."""
    if 0 not in row["seeds"]:
        return None
    _, above = matched_neighbours(row["experts_per_token"]["mean"], [k for k in topk if 0 in topk[k]["seeds"]])
    arm = next(a for a in study.arms if a.name == row["label"])
    own = test_tokens(study.run_dir(arm, 0))
    matched = None
    if above is not None:
        other = next(a for a in study.arms if a.name == topk[above]["label"])
        candidate = test_tokens(study.run_dir(other, 0))
        if torch.equal(candidate["targets_N"], own["targets_N"]):  # the same tokenizer and tokens
            matched = candidate
    result = difficulty(own, matched)
    result["matched"] = topk[above]["label"] if matched is not None else None
    return result


# --- results --------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = [*heading("Compute budget: XMoE against top-k at the same compute", results),
             "## Test split (whole), mean ± std over seeds", "",
             "| arm | seeds | test PPL | experts/token (test) | trained t (mean of layers) | train tok/s | "
             "inference tok/s |", "|---|---|---|---|---|---|---|"]
    for r in results["arms"]:
        speed = r.get("speed") or {}
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {spread_cell(r['perplexity'])} | {spread_cell(r['experts_per_token'])} | "
                     f"{spread_cell(r['final_threshold'], '.3f')} | {speed.get('train_tokens_per_s', 0):.0f} | "
                     f"{speed.get('inference_tokens_per_s', 0):.0f} |")
    lines += ["", "Speeds: seed-0 models, measured interleaved in one process (one thread).", "",
              "## Against the compute-matched top-k", "",
              "| arm | experts/token | vs top-k below: k, ΔPPL | vs top-k at or above: k, ΔPPL | "
              "ΔPPL paired by seed (at or above) | meets the bar |",
              "|---|---|---|---|---|---|"]
    for r in results["arms"]:
        if "versus" not in r:
            continue
        v = r["versus"]

        def side(name: str) -> str:
            if name not in v:
                return "–"
            s = v[name]
            mark = " (better beyond spread)" if s["better_beyond_spread"] else (
                " (worse beyond spread)" if s["worse_beyond_spread"] else " (within spread)")
            return f"top{s['k']:g}, {s['difference']:+.2f}{mark}"

        bar = "(reference)" if r["option"] == "reference" else ("**yes**" if v.get("meets_bar") else "no")
        paired = v.get("above", {}).get("paired")
        lines.append(f"| {r['label']} | {v['measured_experts']:.2f} | {side('below')} | {side('above')} | "
                     f"{spread_cell(paired, '+.2f')} | {bar} |")
    verdict = (f"**Meets the bar:** {', '.join(results['meets_bar'])}." if results["meets_bar"] else
               "**No budget meets the bar**: at no budget does XMoE beat the compute-matched top-k by more than "
               "the seed spread.")
    lines += ["", verdict, "The bar compares unpaired means and spreads (mean ± std over seeds); the paired column is "
              "the mean ± std of the per-seed differences, for reading the size of a difference, not for the bar.",
              "", "## Does a token's expert count track its difficulty? (seed 0, test split)", "",
              "Spearman rank correlation per MoE layer between a token's experts and its loss under the same "
              "model, and under the compute-matched top-k model (the same tokens).", "",
              "| arm | layer | ρ (own loss) | ρ (top-k's loss) | tokens with 1 / 2 / 3 / ≥4 experts |",
              "|---|---|---|---|---|"]
    for r in results["arms"]:
        d = r.get("difficulty")
        if not d:
            continue
        for i, layer in enumerate(d["layers"]):
            h = layer["histogram"] + [0] * 4
            total = sum(h)
            share = [h[1], h[2], h[3], sum(h[4:])]
            lines.append(f"| {r['label']} | {i} | {layer['rho_own_loss']:+.3f} | "
                         f"{layer.get('rho_topk_loss', math.nan):+.3f} | "
                         + " / ".join(f"{100 * c / total:.0f}%" for c in share) + " |")
    lines += ["", *(f"![{p}]({p})" for p in results.get("plots", [])), ""]
    return "\n".join(lines)


def draw(results: dict, out: Path) -> list[str]:
    """budget.png: test perplexity against experts per token (∝ expert FLOPs), against training
    and against inference tokens/s (interleaved)."""
    fig, axes = figure(1, 3, panel=(14 / 3, 4.2), extra="study")
    axes = axes[0]
    xs = (("experts_per_token", "experts per token (test; ∝ expert FLOPs)"),
          ("train_tokens_per_s", "training tokens/s (interleaved)"),
          ("inference_tokens_per_s", "inference tokens/s (interleaved)"))
    for ax, (key, label) in zip(axes, xs):
        for family, marker in (("topk", "s-"), ("budget", "o-"), ("reference", "^")):
            members = [r for r in results["arms"] if (r["router"] == "topk") == (family == "topk")
                       and (family == "topk" or r["option"] == family)]
            points = [(_x(r, key), r) for r in members if _x(r, key) is not None]
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in points], [p[1]["perplexity"]["mean"] for p in points],
                        yerr=[p[1]["perplexity"]["std"] or 0 for p in points], fmt=marker, capsize=3,
                        label=family if family != "reference" else None, linewidth=1)
            for x, r in points:
                ax.annotate(r["label"], (x, r["perplexity"]["mean"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel=label, ylabel="test perplexity (mean ± std)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("XMoE with a compute budget against top-k over the same 64 experts")
    save(fig, out / "budget.png", dpi=STUDY_DPI)
    return ["budget.png"]


def _x(row: dict, key: str) -> float | None:
    if key == "experts_per_token":
        return row["experts_per_token"]["mean"]
    speed = row.get("speed") or {}
    return speed.get(key)
