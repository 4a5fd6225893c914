"""summary.md of a run folder, and ``write_report``, which writes it with the plots
(``xmoe report``; ``xmoe train`` writes one at the end).

What the report folder holds:

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
Without matplotlib, ``write_report`` writes summary.md alone and says so.
"""

from __future__ import annotations

import os
import statistics
import warnings
from pathlib import Path

from xmoe.extras import MissingExtra
from xmoe.markdown import finite, fmt, md_table
from xmoe.sweep import read_sweeps, sweep_table
from xmoe.training.metrics import METRICS_FILE, read_rows, split_rows

from .plots import draw_plots, imbalance, last_routed_val, layer_name

SUMMARY_MD = "summary.md"


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
        plots = draw_plots(train_rows, val_rows, out_dir)
    except MissingExtra as err:  # the numbers are the report; the plots are a view of them
        warnings.warn(f"{err}; the report has summary.md only", stacklevel=2)
        missing = str(err)
    sweeps = read_sweeps(out_dir)
    plots.update({Path(name).with_suffix(".png").name: f"threshold sweep on {sweep['data']}"
                  for name, sweep in sweeps.items() if (out_dir / Path(name).with_suffix(".png").name).is_file()})
    summary = summary_markdown(run_dir, train_rows, val_rows, plots, sweeps, no_plots=missing)
    (out_dir / SUMMARY_MD).write_text(summary, encoding="utf-8")
    return out_dir


def summary_markdown(run_dir: Path, train_rows: list[dict], val_rows: list[dict], plots: dict[str, str],
                     sweeps: dict[str, dict] | None = None, *, no_plots: str | None = None) -> str:
    """The summary.md text: final validation, routing per layer, expert FLOPs, threshold sweeps,
    links to the plots (``no_plots``: why the run's own plots were not drawn)."""
    parts = [f"# Run report: {run_dir.name or run_dir}", "", f"Run folder: `{run_dir}`", ""]
    parts += _training_section(train_rows)
    parts += _validation_section(val_rows)
    last = last_routed_val(val_rows)
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
    speeds = [r["tokens_per_s"] for r in train_rows if finite(r.get("tokens_per_s"))]
    if speeds:
        line += f"; median throughput {statistics.median(speeds):,.0f} tokens/s"
    return ["## Training", "", line + ".", ""]


def _validation_section(val_rows: list[dict]) -> list[str]:
    if not val_rows:
        return ["## Final validation", "", "No validation rows were logged (the run was cut short "
                "before its first evaluation); run `xmoe eval --checkpoint RUN` for the numbers.", ""]
    last = val_rows[-1]
    # A language model reports perplexity; a translation run BLEU and chrF++ (and no perplexity).
    columns = [(name, key, spec) for name, key, spec in _VALIDATION_COLUMNS if finite(last.get(key))]
    rows = md_table(["step"] + [name for name, _, _ in columns] + ["tokens"],
                    [[str(last["step"])] + [format(last[key], spec) for _, key, spec in columns]
                     + [f"{last.get('tokens', 0):,}"]])
    return ["## Final validation", ""] + rows + [""]


_VALIDATION_COLUMNS = (("loss", "loss", ".4f"), ("perplexity", "perplexity", ".2f"), ("BLEU", "bleu", ".2f"),
                       ("chrF++", "chrf", ".2f"))


def _routing_section(row: dict) -> list[str]:
    header = ["layer", "experts/token", "wanted/token", "dropped pairs", "top-1 prob. q25 / median / q75",
              "busiest expert / uniform", "idle experts"]
    lines = md_table(header, ([
        layer_name(i), f"{layer['experts_per_token']:.2f}", fmt(layer.get("wanted_per_token"), ".2f"),
        f"{layer['dropped_pairs']:,}", " / ".join(f"{q:.3f}" for q in layer["top1_quartiles"]),
        f"{imbalance(layer['tokens_per_expert']):.2f}x",
        f"{layer['tokens_per_expert'].count(0)} of {len(layer['tokens_per_expert'])}",
    ] for i, layer in enumerate(row["layers"])))
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


def _flops(value: float) -> str:
    for scale, unit in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOPs"

