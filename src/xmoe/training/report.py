"""Run report: PNG plots and a markdown summary of a run folder's ``metrics.jsonl``, with the
threshold sweeps (xmoe.sweep) found in its report folder (``xmoe report``).

What is drawn (MoE plots come from the last validation row, which holds the per-layer routing
summary that ``xmoe.moe.RoutingSummary`` writes):

    loss.png                              train and validation cross-entropy vs step
    experts_per_token.png                 share of tokens that used k experts, k = 0..E, per MoE layer
    tokens_per_expert.png                 share of tokens each expert received, with the uniform load
    top1_probability.png                  quartiles of the router's top-1 probability, per MoE layer
    experts_per_token_over_training.png   mean experts per token (and capacity drops) vs step
    translation_scores.png                validation BLEU and chrF++ vs step (translation runs)
    summary.md                            final numbers, per-layer routing table, threshold sweeps
                                          found in the report folder, links to the PNGs

The XMoE claim the numbers speak to: a threshold router spends fewer expert FLOPs per token
than the top-k model of equal parameters (``moe_flops_ratio`` < 1) at similar perplexity.

matplotlib (``pip install 'xmoe[report]'``) is imported only inside the plotting functions; without
it ``write_report`` writes summary.md alone and says so. Figures are drawn on a private
Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): the report never touches
pyplot's global figure list or the process-wide backend, so it is safe in a notebook or a
headless job, and there is nothing to close (a figure is freed with its last reference).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from xmoe.errors import UsageError
from xmoe.extras import MissingExtra, needs_extra
from xmoe.sweep import read_sweeps, sweep_table

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
EXPERTS_PNG = "experts_per_token.png"
LOAD_PNG = "tokens_per_expert.png"
TOP1_PNG = "top1_probability.png"
OVER_TRAINING_PNG = "experts_per_token_over_training.png"
SCORES_PNG = "translation_scores.png"
SUMMARY_MD = "summary.md"

_DPI = 120
_TRAIN_COLOR, _VAL_COLOR, _REF_COLOR = "tab:blue", "tab:orange", "tab:red"


# --- entry points ---------------------------------------------------------------------------------


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the report of the run in ``run_dir`` to ``out_dir`` (default ``run_dir/report``).

    A dense run (no routing keys in its metrics) gets ``loss.png`` and ``summary.md``; a MoE run
    also gets the routing plots listed in this module's docstring. Returns ``out_dir``.
    """
    run_dir = Path(run_dir)
    train_rows, val_rows = split_rows(read_rows(run_dir / METRICS_FILE))
    out_dir = run_dir / "report" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, missing = {}, None
    try:
        plots = _draw_plots(train_rows, val_rows, out_dir)
    except MissingExtra as err:  # the numbers are the report; the plots are a view of them
        warnings.warn(f"{err}; the report has summary.md only", stacklevel=2)
        missing = str(err)
    sweeps = read_sweeps(out_dir)
    plots.update({Path(name).with_suffix(".png").name: f"threshold sweep on {sweep['data']}"
                  for name, sweep in sweeps.items() if (out_dir / Path(name).with_suffix(".png").name).is_file()})
    summary = summary_markdown(run_dir, train_rows, val_rows, plots, sweeps, no_plots=missing)
    (out_dir / SUMMARY_MD).write_text(summary, encoding="utf-8")
    return out_dir


def _draw_plots(train_rows: list[dict], val_rows: list[dict], out_dir: Path) -> dict[str, str]:
    """Draw the run's plots into ``out_dir``; returns {file name: what it shows}."""
    plots = {LOSS_PNG: "train and validation loss"}
    plot_loss(train_rows, val_rows, out_dir / LOSS_PNG)
    last = _last_routed_val(val_rows)
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
    if any(_finite(r.get("bleu")) for r in val_rows):
        plot_translation_scores(val_rows, out_dir / SCORES_PNG)
        plots[SCORES_PNG] = "validation BLEU and chrF++ over training"
    return plots


# --- reading --------------------------------------------------------------------------------------


def is_dense_split(moe) -> bool:
    """A dense FFN split into experts (top_k = E): its own baseline is the dense FFN."""
    return moe is not None and moe.top_k >= moe.num_experts


def flops_baseline(moe) -> str:
    """What the MoE FLOPs ratio compares with: a split dense FFN (top_k = E) is its own baseline."""
    if is_dense_split(moe):
        return f"the dense FFN's (all {moe.num_experts} experts' compute)"
    return f"top-{moe.top_k} over the same {moe.num_experts} experts"


def describe_eval(summary: dict, moe, on: str | None = None, *, sharpened: bool = False) -> str:
    """An LM evaluation (``LMEval.to_dict()``) in words, with what to do when nothing is saved
    yet; ``moe``: the model's MoEConfig; ``on``: the text evaluated, if not the validation split;
    ``sharpened``: the run already trained with the router entropy loss."""
    what = "validation loss" if on is None else f"loss on {on}"
    lines = [f"{what} {summary['loss']:.4f}, perplexity {summary['perplexity']:.2f} ({summary['tokens']} tokens)"]
    if "layers" not in summary:
        return "\n".join(lines)
    per_layer = ", ".join(f"{layer['experts_per_token']:.2f}" for layer in summary["layers"])
    if moe.router == "topk":  # its compute is its k: nothing to compare with itself
        return "\n".join(lines + [f"top-{moe.top_k} routing over {moe.num_experts} experts: "
                                  f"{summary['moe_flops_per_token'] / 1e6:.2f}M expert FLOPs per token"])
    ratio = summary["moe_flops_ratio"]
    verdict = f"{1 - ratio:.0%} saved" if ratio <= 1 else f"{ratio:.2f}x its compute: nothing saved yet"
    median_top1 = statistics.fmean(layer["top1_quartiles"][1] for layer in summary["layers"])
    lines += [
        f"experts per token: {summary['experts_per_token']:.2f} on average (per MoE layer: {per_layer})",
        f"MoE expert FLOPs per token: {summary['moe_flops_per_token'] / 1e6:.2f}M = {ratio:.1%} of "
        f"{flops_baseline(moe)} ({verdict})",
        f"router confidence: median top-1 probability {median_top1:.3f} "
        f"(1/E = {1 / len(summary['layers'][0]['tokens_per_expert']):.3f} is a uniform router)",
    ]
    if ratio > 1:
        budget = "" if moe.target_experts or sharpened else "hold the compute with a budget (--model.moe.target_experts=2, docs/method.md), "
        lines.append("  the router is still unsure, so the threshold rule engages many experts; XMoE's saving "
                     "comes as training sharpens it (the paper trains 60k steps). Train longer "
                     f"(--train.max_steps), {budget}or lower the threshold at inference (see the sweep).")
    return "\n".join(lines)


def describe_mt_eval(final: dict, *, bleu_sentences: int) -> str:
    """The last evaluation of a translation run in words (``bleu_sentences``: how many
    validation sentences BLEU and chrF++ were computed on)."""
    line = f"validation loss {final['loss']:.4f}"
    if "bleu" in final:
        line += f", greedy BLEU {final['bleu']:.2f}, chrF++ {final['chrf']:.2f} (first {bleu_sentences} sentences)"
    if "experts_per_token" in final:
        line += (f"\nexperts per token {final['experts_per_token']:.2f}; MoE FLOPs {final['moe_flops_ratio']:.1%} "
                 f"of the top-k model of equal parameters")
    return line


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; errors name the file (and the line) and say what to do."""
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; give the folder `xmoe train --out` wrote")
    rows = parse_metrics(path)
    if not rows:
        raise UsageError(f"{path} has no rows; the run logged nothing yet (train at least one step)")
    return rows


def parse_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (a write cut short by a full disk or a kill:
    no newline at its end) is dropped with a warning; damage anywhere else is an error naming the line."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")  # the last item is what follows the last newline
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            rows.append(_parse_row(line.decode("utf-8", "replace"), path, number))
    if lines[-1].strip():
        try:
            rows.append(_parse_row(lines[-1].decode("utf-8"), path, len(lines)))
        except (ValueError, UnicodeDecodeError):
            warnings.warn(f"{path}: the last line was cut short (a full disk or a killed process?); ignoring it",
                          stacklevel=2)
    return rows


def _parse_row(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}, line {number}: not JSON ({e.msg}); was the file cut short?") from None
    if not isinstance(row, dict) or "step" not in row or row.get("split") not in ("train", "val"):
        raise UsageError(f"{path}, line {number}: expected an object with 'step' and split 'train' or 'val'")
    return row


def split_rows(rows: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows), each in step order."""
    rows = list(rows)
    train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["step"])
    val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: r["step"])
    return train, val


def _last_routed_val(val_rows: list[dict]) -> dict | None:
    routed = [r for r in val_rows if r.get("layers")]
    return routed[-1] if routed else None


def _is_moe(train_rows: list[dict], val_rows: list[dict]) -> bool:
    return any("experts_per_token" in r for r in train_rows + val_rows)


def _layer_name(index: int) -> str:
    return f"MoE layer {index + 1}"


# --- plots ----------------------------------------------------------------------------------------


def plot_loss(train_rows: list[dict], val_rows: list[dict], path: Path) -> None:
    fig, axes = _figure(1, 1, panel=(6.4, 4.0))
    ax = axes[0][0]
    if train_rows:
        key = "ce" if all("ce" in r for r in train_rows) else "loss"
        label = "train cross-entropy" if key == "ce" else "train loss"
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], "-", marker=".",
                color=_TRAIN_COLOR, label=label)
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["loss"] for r in val_rows], "-o",
                color=_VAL_COLOR, label="validation cross-entropy")
    ax.set_title("Loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_experts_histogram(layers: list[dict], step: int, path: Path) -> None:
    """Per layer: share of tokens that used k experts (after capacity), with the mean marked."""
    fig, axes = _layer_grid(len(layers), sharex=True, sharey=True)
    shares = [[h / max(sum(layer["experts_histogram"]), 1) for h in layer["experts_histogram"]] for layer in layers]
    # With many experts the mass sits at small k: show k up to the largest one any token used.
    used = [k for share in shares for k, s in enumerate(share) if s > 0] + [0]
    max_k = max(max(used), math.ceil(max(layer["experts_per_token"] for layer in layers)), 2)
    for i, (ax, layer, share) in enumerate(zip(_flat(axes), layers, shares)):
        ax.bar(range(len(share)), share, color=_TRAIN_COLOR, width=0.8)
        mean = layer["experts_per_token"]
        ax.axvline(mean, color=_REF_COLOR, linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
        ax.set_title(_layer_name(i))
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlim(-0.6, max_k + 0.6)
        ax.set_ylim(0, 1.2 * max(max(s) for s in shares) or 1.0)
        ax.set_xlabel("experts used by a token")
        ax.set_ylabel("share of tokens")
        ax.legend(fontsize=8, loc="upper right")
    num_experts = len(layers[0]["experts_histogram"]) - 1
    fig.suptitle(f"Experts per token (validation, step {step})\n{num_experts} experts per layer")
    _save(fig, path)


def plot_tokens_per_expert(layers: list[dict], step: int, path: Path) -> None:
    """Per layer: share of tokens routed to each expert, against the uniform load."""
    fig, axes = _layer_grid(len(layers), sharex=True, sharey=True)
    all_shares = [[n / max(sum(layer["experts_histogram"]), 1) for n in layer["tokens_per_expert"]]
                  for layer in layers]
    top = max(max(s) for s in all_shares)
    for i, (ax, layer, shares) in enumerate(zip(_flat(axes), layers, all_shares)):
        per_expert = layer["tokens_per_expert"]
        uniform = sum(shares) / len(shares)
        ax.bar(range(len(shares)), shares, color=_TRAIN_COLOR, width=0.8)
        ax.set_ylim(0, 1.25 * top or 1.0)
        ax.axhline(uniform, color=_REF_COLOR, linestyle="--", linewidth=1, label=f"uniform {uniform:.3f}")
        ax.set_title(f"{_layer_name(i)} (busiest = {_imbalance(per_expert):.2f}x uniform)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlabel("expert index")
        ax.set_ylabel("share of tokens routed to it")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Tokens per expert (validation, step {step})")
    _save(fig, path)


def plot_top1_quartiles(layers: list[dict], step: int, path: Path) -> None:
    """Per layer, a box from the 25% to the 75% quantile of the top-1 probability, median inside."""
    n = len(layers)
    fig, axes = _figure(1, 1, panel=(max(5.0, 1.1 * n + 2.0), 4.0))
    ax = axes[0][0]
    boxes = [_box(layer["top1_quartiles"], _layer_name(i)) for i, layer in enumerate(layers)]
    ax.bxp(boxes, showfliers=False, showcaps=False, widths=0.5,
           medianprops={"color": _REF_COLOR, "linewidth": 2})
    num_experts = len(layers[0]["tokens_per_expert"])
    ax.axhline(1 / num_experts, color="gray", linestyle=":", linewidth=1,
               label=f"uniform router (1/E = {1 / num_experts:.3f})")
    top = max([q for layer in layers for q in layer["top1_quartiles"] if _finite(q)] + [1 / num_experts])
    ax.set_ylim(0, min(1.0, 1.25 * top))
    ax.set_title(f"Router top-1 probability (validation, step {step})\nbox: middle 50% of tokens, line: median")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("top-1 probability")
    if n > 6:
        ax.tick_params(axis="x", labelrotation=45)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_experts_over_training(train_rows: list[dict], val_rows: list[dict], path: Path):
    """Mean experts per token (over MoE layers) vs step; below it, tokens that lost pairs to capacity."""
    train = [r for r in train_rows if "experts_per_token" in r]
    val = [r for r in val_rows if "experts_per_token" in r]
    dropped = [r for r in train if "dropped_token_fraction" in r]
    fig, axes = _figure(2 if dropped else 1, 1, panel=(6.4, 3.0), sharex=True)
    ax = axes[0][0]
    wanted = [r for r in train if "wanted_experts_per_token" in r]
    if train:
        ax.plot([r["step"] for r in train], [r["experts_per_token"] for r in train], "-", marker=".",
                color=_TRAIN_COLOR, label="train: kept (after capacity)")
    if wanted:
        ax.plot([r["step"] for r in wanted], [r["wanted_experts_per_token"] for r in wanted], "--",
                color=_TRAIN_COLOR, alpha=0.6, label="train: wanted by the router (before capacity)")
    if val:
        ax.plot([r["step"] for r in val], [r["experts_per_token"] for r in val], "o",
                color=_VAL_COLOR, label="validation: dropless, so kept = wanted")
    ax.set_title("Experts per token over training (mean over MoE layers)")
    ax.set_ylabel("experts per token")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if dropped:
        low = axes[1][0]
        low.plot([r["step"] for r in dropped], [r["dropped_token_fraction"] for r in dropped], "-",
                 marker=".", color=_TRAIN_COLOR)
        low.set_ylim(-0.05, 1.05)
        low.set_title("Train tokens that lost at least one expert to capacity")
        low.set_ylabel("share of tokens")
        low.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    _save(fig, path)
    return fig  # for tests


def plot_translation_scores(val_rows: list[dict], path: Path) -> None:
    """Validation BLEU and chrF++ (sacreBLEU, greedy) vs step, for a translation run."""
    scored = [r for r in val_rows if _finite(r.get("bleu"))]
    fig, axes = _figure(1, 1, panel=(6.4, 4.0))
    ax = axes[0][0]
    ax.plot([r["step"] for r in scored], [r["bleu"] for r in scored], "-o", color=_TRAIN_COLOR, label="BLEU")
    if all(_finite(r.get("chrf")) for r in scored):
        ax.plot([r["step"] for r in scored], [r["chrf"] for r in scored], "-s", color=_VAL_COLOR, label="chrF++")
    ax.set_title("Validation translation scores (greedy decoding)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("score")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _figure(nrows: int, ncols: int, *, panel: tuple[float, float], **subplot_kw: Any):
    """A figure on its own Agg canvas (no pyplot state) and a 2-D array of axes."""
    with needs_extra("report", "the report's plots"):
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
    fig, axes = _figure(nrows, ncols, panel=(max(4.2, 6.4 / ncols), 3.4), **subplot_kw)
    for ax in _flat(axes)[num_layers:]:
        ax.set_visible(False)
    return fig, axes


def _flat(axes) -> list:
    return [ax for row in axes for ax in row]


def _box(quartiles: Sequence[float], label: str) -> dict:
    q25, q50, q75 = quartiles
    # Only the quartiles are logged: the whiskers sit on the box edges rather than invent a range.
    return {"label": label, "q1": q25, "med": q50, "q3": q75, "whislo": q25, "whishi": q75, "fliers": []}


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


# --- summary --------------------------------------------------------------------------------------


def summary_markdown(run_dir: Path, train_rows: list[dict], val_rows: list[dict], plots: dict[str, str],
                     sweeps: dict[str, dict] | None = None, *, no_plots: str | None = None) -> str:
    """The summary.md text: final validation, routing per layer, expert FLOPs, threshold sweeps,
    links to the plots (``no_plots``: why the run's own plots were not drawn)."""
    parts = [f"# Run report: {run_dir.name or run_dir}", "", f"Run folder: `{run_dir}`", ""]
    parts += _training_section(train_rows)
    parts += _validation_section(val_rows)
    last = _last_routed_val(val_rows)
    if last is not None:
        parts += _routing_section(last)
    for sweep in (sweeps or {}).values():
        at = f", checkpoint at step {sweep['step']}" if sweep.get("step") is not None else ""
        parts += [f"## Threshold sweep ({sweep['data']}{at})", "", sweep_table(sweep["rows"]), ""]
    parts += ["## Plots", ""] + ([f"Not drawn: {no_plots}.", ""] if no_plots else [])
    parts += [f"- [{name}]({name}): {what}" for name, what in plots.items()] + [""]
    return "\n".join(parts)


def _training_section(train_rows: list[dict]) -> list[str]:
    if not train_rows:
        return ["## Training", "", "No training rows were logged.", ""]
    last = train_rows[-1]
    line = f"{last['step']} steps logged; last train loss {last['loss']:.4f}"
    if "ce" in last:
        line += f" (cross-entropy {last['ce']:.4f})"
    speeds = [r["tokens_per_s"] for r in train_rows if _finite(r.get("tokens_per_s"))]
    if speeds:
        line += f"; median throughput {statistics.median(speeds):,.0f} tokens/s"
    return ["## Training", "", line + ".", ""]


def _validation_section(val_rows: list[dict]) -> list[str]:
    if not val_rows:
        return ["## Final validation", "", "No validation rows were logged (the run was cut short "
                "before its first evaluation); run `xmoe eval --checkpoint RUN` for the numbers.", ""]
    last = val_rows[-1]
    # A language model reports perplexity; a translation run BLEU and chrF++ (and no perplexity).
    columns = [(name, key, spec) for name, key, spec in _VALIDATION_COLUMNS if _finite(last.get(key))]
    rows = [_md_row(["step"] + [name for name, _, _ in columns] + ["tokens"]),
            _md_row(["---"] * (len(columns) + 2)),
            _md_row([str(last["step"])] + [format(last[key], spec) for _, key, spec in columns]
                    + [f"{last.get('tokens', 0):,}"])]
    return ["## Final validation", ""] + rows + [""]


_VALIDATION_COLUMNS = (("loss", "loss", ".4f"), ("perplexity", "perplexity", ".2f"), ("BLEU", "bleu", ".2f"),
                       ("chrF++", "chrf", ".2f"))


def _routing_section(row: dict) -> list[str]:
    header = ["layer", "experts/token", "wanted/token", "dropped pairs", "top-1 prob. q25 / median / q75",
              "busiest expert / uniform", "idle experts"]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for i, layer in enumerate(row["layers"]):
        per_expert = layer["tokens_per_expert"]
        lines.append(_md_row([
            _layer_name(i), f"{layer['experts_per_token']:.2f}", _fmt(layer.get("wanted_per_token"), ".2f"),
            f"{layer['dropped_pairs']:,}", " / ".join(f"{q:.3f}" for q in layer["top1_quartiles"]),
            f"{_imbalance(per_expert):.2f}x", f"{sum(1 for n in per_expert if n == 0)} of {len(per_expert)}",
        ]))
    dropped = sum(layer["dropped_pairs"] for layer in row["layers"])
    notes = [f"- Experts per token, mean over MoE layers: {row['experts_per_token']:.2f}",
             f"- Dropped (token, expert) pairs, all layers: {dropped:,}"]
    if "moe_flops_per_token" in row and "topk_moe_flops_per_token" in row:
        notes.append(
            f"- MoE expert FLOPs per token: {_flops(row['moe_flops_per_token'])}, "
            f"{row['moe_flops_ratio']:.2f}x the top-k model of equal parameters "
            f"({_flops(row['topk_moe_flops_per_token'])})"
        )
    return [f"## Routing (validation, step {row['step']})", ""] + lines + [""] + notes + [""]


def _imbalance(per_expert: Sequence[float]) -> float:
    """Load of the busiest expert relative to the uniform load (1.0 is perfectly balanced)."""
    mean = sum(per_expert) / len(per_expert)
    return max(per_expert) / mean if mean > 0 else 0.0


def _flops(value: float) -> str:
    for scale, unit in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOPs"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


__all__ = ["parse_metrics", "plot_translation_scores", "read_rows", "split_rows", "summary_markdown", "write_report"]
