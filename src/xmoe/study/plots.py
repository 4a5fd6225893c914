"""The study's plots (matplotlib, ``pip install 'xmoe[study]'``; private Agg canvases: no pyplot
state, safe headless).

    main.png          validation perplexity (mean ± std over seeds) against MoE FLOPs per token
                      relative to the top-k budget: XMoE's claim is "lower and to the left"
    threshold.png     perplexity and experts per token against t, trained at t vs evaluated at t
    granularity.png   perplexity and experts per token against expert width (equal parameters)
    loss_curves.png   training cross-entropy of the main models (first seed), smoothed
"""

from __future__ import annotations

from pathlib import Path

from xmoe.report.plots import figure, save
from xmoe.training import read_metrics

STUDY_DPI = 110


def write_plots(results: dict, out: Path) -> list[str]:
    """Draw every plot the results have rows for; returns the file names written in ``out``."""
    written = []
    drawers = (("main.png", _main, "main"), ("threshold.png", _threshold, "threshold_train"),
               ("granularity.png", _granularity, "granularity"), ("loss_curves.png", _loss_curves, "main"))
    for name, draw, key in drawers:
        if results.get(key, {}).get("rows"):
            draw(results, out, out / name)
            written.append(name)
    return written


def _figure(ncols: int):
    fig, axes = figure(1, ncols, panel=(5.6, 4.2), extra="study")
    return fig, axes[0]


def _err(cell: dict | None) -> float:
    return 0.0 if cell is None or cell["std"] is None else cell["std"]


def _main(results: dict, out: Path, path: Path) -> None:
    fig, (ax,) = _figure(1)
    for r in results["main"]["rows"]:
        ppl = r["perplexity"]
        if "moe_flops_ratio" not in r:  # dense: a reference line, it has no MoE layer
            ax.axhline(ppl["mean"], color="gray", linestyle="--", linewidth=1, label=f"{r['label']} (no MoE)")
            continue
        x = r["moe_flops_ratio"]
        marker = "o" if r["label"].startswith("xmoe") else "s"
        ax.errorbar(x["mean"], ppl["mean"], xerr=_err(x), yerr=_err(ppl), fmt=marker, capsize=3, label=r["label"])
    ax.axvline(1.0, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xlabel("MoE FLOPs per token / top-k budget (dropless eval)")
    ax.set_ylabel("validation perplexity (mean ± std over seeds)")
    ax.set_title("Main comparison at equal parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, dpi=STUDY_DPI)


def _threshold(results: dict, out: Path, path: Path) -> None:
    fig, (ax_ppl, ax_exp) = _figure(2)
    series = (("trained at t", results["threshold_train"]["rows"], "-o"),
              ("trained at 0.9, evaluated at t", results["threshold_inference"]["rows"], "--s"))
    for label, rows, style in series:
        ts = [r["threshold"] for r in rows]
        ax_ppl.errorbar(ts, [r["perplexity"]["mean"] for r in rows], yerr=[_err(r["perplexity"]) for r in rows],
                        fmt=style, capsize=3, label=label)
        if all("experts_per_token" in r for r in rows):
            ax_exp.plot(ts, [r["experts_per_token"]["mean"] for r in rows], style, label=label)
    ax_ppl.set_ylabel("validation perplexity")
    ax_exp.set_ylabel("experts per token (dropless eval, mean over MoE layers)")
    for ax in (ax_ppl, ax_exp):
        ax.set_xlabel("threshold t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_ppl.set_title("Threshold: quality")
    ax_exp.set_title("Threshold: compute")
    save(fig, path, dpi=STUDY_DPI)


def _granularity(results: dict, out: Path, path: Path) -> None:
    fig, (ax_ppl, ax_exp) = _figure(2)
    rows = sorted(results["granularity"]["rows"], key=lambda r: -r["expert_dim"])
    widths = [r["expert_dim"] for r in rows]
    ax_ppl.errorbar(widths, [r["perplexity"]["mean"] for r in rows], yerr=[_err(r["perplexity"]) for r in rows],
                    fmt="-o", capsize=3)
    ax_exp.plot(widths, [r["moe_flops_ratio"]["mean"] for r in rows], "-o", label="MoE FLOPs / top-k budget")
    ax_exp.plot(widths, [r["experts_per_token"]["mean"] / r["num_experts"] for r in rows], "-s",
                label="share of experts engaged")
    for ax in (ax_ppl, ax_exp):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"{r['num_experts']}x{r['expert_dim']}" for r in rows])
        ax.set_xlabel("experts x width (equal total parameters)")
        ax.grid(alpha=0.3)
    ax_ppl.set_ylabel("validation perplexity")
    ax_exp.set_ylabel("fraction")
    ax_exp.legend(fontsize=8)
    ax_ppl.set_title("Granularity: quality (XMoE t = 0.9)")
    ax_exp.set_title("Granularity: compute")
    save(fig, path, dpi=STUDY_DPI)


def _loss_curves(results: dict, out: Path, path: Path, window: int = 10) -> None:
    fig, (ax,) = _figure(1)
    first_seed = results["seeds"][0]
    for r in results["runs"].values():
        if r["seed"] != first_seed or r["label"] not in {row["label"] for row in results["main"]["rows"]}:
            continue
        rows = [m for m in read_metrics(out / r["run_dir"] / "metrics.jsonl") if m["split"] == "train"]
        ce = [m["ce"] for m in rows]
        smooth = [sum(ce[max(0, i - window + 1): i + 1]) / len(ce[max(0, i - window + 1): i + 1]) for i in range(len(ce))]
        ax.plot([m["step"] for m in rows], smooth, label=r["label"], linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training cross-entropy (moving mean of {window} logged steps)")
    ax.set_title(f"Training curves, seed {first_seed}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save(fig, path, dpi=STUDY_DPI)
