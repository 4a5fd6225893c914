"""The run's plots, drawn from the rows of its metrics.jsonl (xmoe.training.metrics). MoE plots
come from the last validation row, which holds the per-layer routing summary that
``xmoe.moe.RoutingSummary`` writes.

matplotlib (``pip install 'xmoe[report]'``) is imported only inside ``figure``. Figures are drawn on
a private Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): nothing here touches
pyplot's global figure list or the process-wide backend, so it is safe in a notebook or a headless
job, and there is nothing to close (a figure is freed with its last reference).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from xmoe.extras import needs_extra
from xmoe.markdown import finite


LOSS_PNG = "loss.png"
EXPERTS_PNG = "experts_per_token.png"
LOAD_PNG = "tokens_per_expert.png"
TOP1_PNG = "top1_probability.png"
OVER_TRAINING_PNG = "experts_per_token_over_training.png"
SCORES_PNG = "translation_scores.png"

_DPI = 120
TRAIN_COLOR, VAL_COLOR, REF_COLOR = "tab:blue", "tab:orange", "tab:red"


def draw_plots(train_rows: list[dict], val_rows: list[dict], out_dir: Path) -> dict[str, str]:
    """Draw the run's plots into ``out_dir``; returns {file name: what it shows}."""
    plots = {LOSS_PNG: "train and validation loss"}
    plot_loss(train_rows, val_rows, out_dir / LOSS_PNG)
    last = last_routed_val(val_rows)
    if last is not None:
        layers, step = last["layers"], last["step"]
        plot_experts_histogram(layers, step, out_dir / EXPERTS_PNG)
        plot_tokens_per_expert(layers, step, out_dir / LOAD_PNG)
        plot_top1_quartiles(layers, step, out_dir / TOP1_PNG)
        plots.update({EXPERTS_PNG: "experts per token, per MoE layer",
                      LOAD_PNG: "tokens per expert (load balance), per MoE layer",
                      TOP1_PNG: "router top-1 probability, per MoE layer"})
    if _is_moe(train_rows, val_rows):
        plot_experts_over_training(train_rows, val_rows, out_dir / OVER_TRAINING_PNG)
        plots[OVER_TRAINING_PNG] = "experts per token over training"
    if any(finite(r.get("bleu")) for r in val_rows):
        plot_translation_scores(val_rows, out_dir / SCORES_PNG)
        plots[SCORES_PNG] = "validation BLEU and chrF++ over training"
    return plots


def last_routed_val(val_rows: list[dict]) -> dict | None:
    routed = [r for r in val_rows if r.get("layers")]
    return routed[-1] if routed else None


def _is_moe(train_rows: list[dict], val_rows: list[dict]) -> bool:
    return any("experts_per_token" in r for r in train_rows + val_rows)


def layer_name(index: int) -> str:
    return f"MoE layer {index + 1}"


def plot_loss(train_rows: list[dict], val_rows: list[dict], path: Path) -> None:
    fig, axes = figure(1, 1, panel=(6.4, 4.0))
    ax = axes[0][0]
    if train_rows:
        key = "ce" if all("ce" in r for r in train_rows) else "loss"
        label = "train cross-entropy" if key == "ce" else "train loss"
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], "-", marker=".",
                color=TRAIN_COLOR, label=label)
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["loss"] for r in val_rows], "-o",
                color=VAL_COLOR, label="validation cross-entropy")
    ax.set_title("Loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def plot_experts_histogram(layers: list[dict], step: int, path: Path) -> None:
    """Per layer: share of tokens that used k experts (after capacity), with the mean marked."""
    fig, axes = _layer_grid(len(layers), sharex=True, sharey=True)
    shares = [[h / max(sum(layer["experts_histogram"]), 1) for h in layer["experts_histogram"]] for layer in layers]
    # With many experts the mass sits at small k: show k up to the largest one any token used.
    used = [k for share in shares for k, s in enumerate(share) if s > 0] + [0]
    max_k = max(max(used), math.ceil(max(layer["experts_per_token"] for layer in layers)), 2)
    for i, (ax, layer, share) in enumerate(zip(_flat(axes), layers, shares)):
        ax.bar(range(len(share)), share, color=TRAIN_COLOR, width=0.8)
        mean = layer["experts_per_token"]
        ax.axvline(mean, color=REF_COLOR, linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
        ax.set_title(layer_name(i))
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlim(-0.6, max_k + 0.6)
        ax.set_ylim(0, 1.2 * max(max(s) for s in shares) or 1.0)
        ax.set_xlabel("experts used by a token")
        ax.set_ylabel("share of tokens")
        ax.legend(fontsize=8, loc="upper right")
    num_experts = len(layers[0]["experts_histogram"]) - 1
    fig.suptitle(f"Experts per token (validation, step {step})\n{num_experts} experts per layer")
    save(fig, path)


def plot_tokens_per_expert(layers: list[dict], step: int, path: Path) -> None:
    """Per layer: share of tokens routed to each expert, against the uniform load."""
    fig, axes = _layer_grid(len(layers), sharex=True, sharey=True)
    all_shares = [[n / max(sum(layer["experts_histogram"]), 1) for n in layer["tokens_per_expert"]]
                  for layer in layers]
    top = max(max(s) for s in all_shares)
    for i, (ax, layer, shares) in enumerate(zip(_flat(axes), layers, all_shares)):
        per_expert = layer["tokens_per_expert"]
        uniform = sum(shares) / len(shares)
        ax.bar(range(len(shares)), shares, color=TRAIN_COLOR, width=0.8)
        ax.set_ylim(0, 1.25 * top or 1.0)
        ax.axhline(uniform, color=REF_COLOR, linestyle="--", linewidth=1, label=f"uniform {uniform:.3f}")
        ax.set_title(f"{layer_name(i)} (busiest = {imbalance(per_expert):.2f}x uniform)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlabel("expert index")
        ax.set_ylabel("share of tokens routed to it")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Tokens per expert (validation, step {step})")
    save(fig, path)


def plot_top1_quartiles(layers: list[dict], step: int, path: Path) -> None:
    """Per layer, a box from the 25% to the 75% quantile of the top-1 probability, median inside."""
    n = len(layers)
    fig, axes = figure(1, 1, panel=(max(5.0, 1.1 * n + 2.0), 4.0))
    ax = axes[0][0]
    boxes = [_box(layer["top1_quartiles"], layer_name(i)) for i, layer in enumerate(layers)]
    ax.bxp(boxes, showfliers=False, showcaps=False, widths=0.5,
           medianprops={"color": REF_COLOR, "linewidth": 2})
    num_experts = len(layers[0]["tokens_per_expert"])
    ax.axhline(1 / num_experts, color="gray", linestyle=":", linewidth=1,
               label=f"uniform router (1/E = {1 / num_experts:.3f})")
    top = max([q for layer in layers for q in layer["top1_quartiles"] if finite(q)] + [1 / num_experts])
    ax.set_ylim(0, min(1.0, 1.25 * top))
    ax.set_title(f"Router top-1 probability (validation, step {step})\nbox: middle 50% of tokens, line: median")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("top-1 probability")
    if n > 6:
        ax.tick_params(axis="x", labelrotation=45)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def plot_experts_over_training(train_rows: list[dict], val_rows: list[dict], path: Path):
    """Mean experts per token (over MoE layers) vs step; below it, tokens that lost pairs to capacity."""
    train = [r for r in train_rows if "experts_per_token" in r]
    val = [r for r in val_rows if "experts_per_token" in r]
    dropped = [r for r in train if "dropped_token_fraction" in r]
    fig, axes = figure(2 if dropped else 1, 1, panel=(6.4, 3.0), sharex=True)
    ax = axes[0][0]
    wanted = [r for r in train if "wanted_experts_per_token" in r]
    if train:
        ax.plot([r["step"] for r in train], [r["experts_per_token"] for r in train], "-", marker=".",
                color=TRAIN_COLOR, label="train: kept (after capacity)")
    if wanted:
        ax.plot([r["step"] for r in wanted], [r["wanted_experts_per_token"] for r in wanted], "--",
                color=TRAIN_COLOR, alpha=0.6, label="train: wanted by the router (before capacity)")
    if val:
        ax.plot([r["step"] for r in val], [r["experts_per_token"] for r in val], "o",
                color=VAL_COLOR, label="validation: dropless, so kept = wanted")
    ax.set_title("Experts per token over training (mean over MoE layers)")
    ax.set_ylabel("experts per token")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if dropped:
        low = axes[1][0]
        low.plot([r["step"] for r in dropped], [r["dropped_token_fraction"] for r in dropped], "-",
                 marker=".", color=TRAIN_COLOR)
        low.set_ylim(-0.05, 1.05)
        low.set_title("Train tokens that lost at least one expert to capacity")
        low.set_ylabel("share of tokens")
        low.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    save(fig, path)
    return fig  # for tests


def plot_translation_scores(val_rows: list[dict], path: Path) -> None:
    """Validation BLEU and chrF++ (sacreBLEU, greedy) vs step, for a translation run."""
    scored = [r for r in val_rows if finite(r.get("bleu"))]
    fig, axes = figure(1, 1, panel=(6.4, 4.0))
    ax = axes[0][0]
    ax.plot([r["step"] for r in scored], [r["bleu"] for r in scored], "-o", color=TRAIN_COLOR, label="BLEU")
    if all(finite(r.get("chrf")) for r in scored):
        ax.plot([r["step"] for r in scored], [r["chrf"] for r in scored], "-s", color=VAL_COLOR, label="chrF++")
    ax.set_title("Validation translation scores (greedy decoding)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("score")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def figure(nrows: int, ncols: int, *, panel: tuple[float, float], extra: str = "report", **subplot_kw: Any):
    """A figure on its own Agg canvas (no pyplot state) and a 2-D array of axes; matplotlib comes
    with ``extra`` (the report's, or the study's for xmoe.study's plots)."""
    with needs_extra(extra, f"the {extra}'s plots"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)


def _integer_ticks():
    with needs_extra("report", "the report's plots"):
        from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _layer_grid(num_layers: int, **subplot_kw: Any):
    """One panel per MoE layer, up to four across; unused panels hidden."""
    ncols = min(num_layers, 4)
    nrows = math.ceil(num_layers / ncols)
    fig, axes = figure(nrows, ncols, panel=(max(4.2, 6.4 / ncols), 3.4), **subplot_kw)
    for ax in _flat(axes)[num_layers:]:
        ax.set_visible(False)
    return fig, axes


def _flat(axes) -> list:
    return [ax for row in axes for ax in row]


def _box(quartiles: Sequence[float], label: str) -> dict:
    q25, q50, q75 = quartiles
    # Only the quartiles are logged: the whiskers sit on the box edges rather than invent a range.
    return {"label": label, "q1": q25, "med": q50, "q3": q75, "whislo": q25, "whishi": q75, "fliers": []}


def save(fig, path: Path, dpi: int = _DPI) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def imbalance(per_expert: Sequence[float]) -> float:
    """Load of the busiest expert relative to the uniform load (1.0 is perfectly balanced)."""
    mean = sum(per_expert) / len(per_expert)
    return max(per_expert) / mean if mean > 0 else 0.0

