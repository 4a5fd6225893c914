"""Threshold sweeps: the record a sweep is saved as (threshold_sweep*.json), its markdown table
and its plot (perplexity against the MoE FLOPs ratio, one point per threshold). Moved as it was
from xmoe.training.report; the summary (xmoe.report.summary) lists the sweeps it finds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from xmoe.errors import UsageError

from .plots import REF_COLOR, TRAIN_COLOR, figure, save
from .table import finite, fmt, md_row

SWEEP_STEM = "threshold_sweep"  # + "_<data file stem>" for a sweep on other text


def plot_threshold_sweep(rows: Sequence[dict], path: str | os.PathLike, *, baseline: str = "top-k",
                         data: str = "the validation text") -> Path:
    """Perplexity on ``data`` vs MoE FLOPs ratio, one point per threshold (annotated), to ``path``.

    ``baseline``: what ratio 1 is, "top-k" (the top-k model of equal parameters) or "dense" (the
    dense FFN the experts were split from: a converted or split model, whose t = 1 is that dense
    model, drawn as a horizontal line)."""
    if baseline not in ("top-k", "dense"):
        raise UsageError(f"baseline must be 'top-k' or 'dense', got {baseline!r}")
    rows = _sweep_rows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(threshold_sweep_figure(rows, baseline=baseline, data=data), path)
    return path


def threshold_sweep_figure(rows: Sequence[dict], *, baseline: str, data: str):
    """The figure ``plot_threshold_sweep`` saves (a matplotlib Figure)."""
    fig, axes = figure(1, 1, panel=(6.4, 4.4))
    ax = axes[0][0]
    by_cost = sorted(rows, key=lambda r: r["moe_flops_ratio"])
    xs = [r["moe_flops_ratio"] for r in by_cost]
    ys = [r["perplexity"] for r in by_cost]
    ax.plot(xs, ys, "-o", color=TRAIN_COLOR, label="threshold router")
    for i, r in enumerate(by_cost):
        label = f"t={r['threshold']:g}"
        if r.get("experts_per_token") is not None:
            label += f"\n{r['experts_per_token']:.2f} exp/tok"
        # Neighbours alternate above and below the line, so close points (t = 0.95, 1) stay legible.
        ax.annotate(label, (r["moe_flops_ratio"], r["perplexity"]), textcoords="offset points",
                    xytext=(6, 6 if i % 2 == 0 else -22), fontsize=8)
    reference = "dense FFN" if baseline == "dense" else "top-k model"
    ax.axvline(1.0, color=REF_COLOR, linestyle="--", linewidth=1, label=f"{reference}'s FLOPs (ratio 1)")
    dense = [r["perplexity"] for r in rows if r["threshold"] >= 1]
    if baseline == "dense" and dense:
        ax.axhline(dense[0], color="gray", linestyle=":", linewidth=1, label=f"dense model (t = 1): {dense[0]:.2f}")
    ax.set_title("Threshold sweep: perplexity vs expert compute")
    ax.set_xlabel("MoE FLOPs per token / " + ("the dense FFN's" if baseline == "dense"
                                              else "top-k model of equal parameters"))
    ax.set_ylabel(f"perplexity on {data}")
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def sweep_table(rows: Sequence[dict]) -> str:
    """A markdown table of a threshold sweep, one row per threshold (ascending)."""
    rows = sorted(_sweep_rows(rows), key=lambda r: r["threshold"])
    with_experts = any(r.get("experts_per_token") is not None for r in rows)
    header = ["threshold"] + (["experts/token"] if with_experts else []) + ["MoE FLOPs ratio", "perplexity"]
    lines = [md_row(header), md_row(["---"] * len(header))]
    for r in rows:
        cells = [f"{r['threshold']:g}"]
        if with_experts:
            cells.append(fmt(r.get("experts_per_token"), ".2f"))
        cells += [f"{r['moe_flops_ratio']:.3f}", f"{r['perplexity']:.2f}"]
        lines.append(md_row(cells))
    return "\n".join(lines)


def sweep_record(rows: Sequence[dict], *, data: str, step: int | None, baseline: str) -> dict:
    """What threshold_sweep*.json holds: the rows, the text they were measured on (``data``) and
    the checkpoint's step, so a sweep is never mistaken for another."""
    return {"data": data, "step": step, "baseline": baseline, "rows": list(rows)}


def sweep_name(data_path: str | None) -> str:
    """threshold_sweep (the run's validation text) or threshold_sweep_<stem> (other text)."""
    if data_path is None:
        return SWEEP_STEM
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(data_path).stem) or "data"
    return f"{SWEEP_STEM}_{stem}"


def read_sweeps(folder: Path) -> dict[str, dict]:
    """The sweep records (``sweep_record``) saved in ``folder``, by file name; files in another
    format (a bare list of rows, as converted Hugging Face models write) count as validation text."""
    sweeps = {}
    for path in sorted(folder.glob(f"{SWEEP_STEM}*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if isinstance(record, list):
            record = {"data": "the given text", "step": None, "rows": record}
        if isinstance(record, dict) and isinstance(record.get("rows"), list) and record["rows"]:
            sweeps[path.name] = record
    return sweeps


def _sweep_rows(rows: Sequence[dict]) -> list[dict]:
    rows = list(rows)
    if not rows:
        raise UsageError("the threshold sweep has no rows; give at least one threshold")
    for i, row in enumerate(rows):
        missing = [k for k in ("threshold", "perplexity", "moe_flops_ratio") if not finite(row.get(k))]
        if missing:
            raise UsageError(f"threshold sweep row {i} needs numbers for {missing}, got {row!r}")
    return rows


__all__ = ["SWEEP_STEM", "plot_threshold_sweep", "read_sweeps", "sweep_name", "sweep_record", "sweep_table",
           "threshold_sweep_figure"]
