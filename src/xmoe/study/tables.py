"""results.md: the study's tables in markdown, from the results dict (nothing recomputed here).

Cells read "mean ± std" over seeds (std: sample standard deviation), or a single value when
only one seed ran. MoE FLOPs are the experts' forward FLOPs per token summed over the MoE
layers; the ratio compares them with the top-k budget of the same experts (one dense FFN's
FLOPs per MoE layer), the quantity behind XMoE's "over 50% less computation" (Sec. 4).
"val PPL" is dropless (how `xmoe eval` scores); "val PPL, train capacity" is the same
evaluation with the training capacity factor, the regime the model was trained in.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

from xmoe.markdown import md_row, md_table

from .aggregate import spread_cell


def _spread(key: str, spec: str, scale: float = 1.0) -> Callable[[dict], str]:
    return lambda row: spread_cell(row.get(key), spec, scale)


def _layers(row: dict) -> str:
    layers = row.get("experts_per_token_layers")
    return " / ".join(f"{v:.2f}" for v in layers) if layers else "–"


# Every column a table may show: its header and a row's cell (a row of aggregate.summarize).
COLUMNS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "params": ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
    "seeds": ("seeds", lambda r: str(r["n"])),
    "models": ("models", lambda r: str(r["n"])),
    "ppl": ("val PPL", _spread("perplexity", ".2f")),
    "capacity_ppl": ("val PPL, train capacity", _spread("capacity_perplexity", ".2f")),
    "layers": ("experts/token per MoE layer", _layers),
    "mflops": ("MoE MFLOPs/token", _spread("moe_flops_per_token", ".2f", 1e-6)),
    "ratio": ("vs top-k FLOPs", _spread("moe_flops_ratio", ".2f")),
    "train_experts": ("train experts/token", _spread("train_experts_per_token", ".2f")),
    "dropped": ("dropped pairs/token (train capacity)", _spread("dropped_pairs_per_token", ".3f")),
    "lost": ("train tokens that lost a pair", _spread("train_dropped_token_fraction", ".3f")),
    "train_tps": ("train tok/s", _spread("train_tokens_per_s", ",.0f")),
    "inference_tps": ("inference tok/s", _spread("inference_tokens_per_s", ",.0f")),
    "sweep_tps": ("inference tok/s", _spread("tokens_per_second", ",.0f")),  # an inference sweep's point
    "train_s": ("train s", _spread("train_seconds", ".0f")),
}


def _table(first: tuple[str, Callable[[dict], str]], columns: Sequence[str], rows: list[dict]) -> list[str]:
    """A table of ``rows``: the ``first`` column (header, cell) that names a row, then ``columns``."""
    header, cells = zip(first, *(COLUMNS[c] for c in columns))
    return md_table(header, ([cell(r) for cell in cells] for r in rows)) + [""]


def results_markdown(results: dict) -> str:
    changed = results["user_overrides"]
    parts = [
        f"# xmoe study `{results['study']}`: {results['scale']} scale",
        "",
        f"Corpus: {results['data']}. Scale: {results['scale_note']}"
        + (f", changed on the command line: `{json.dumps(changed)}`" if changed else "")
        + f". Seeds: main comparison {_seeds(results['seeds'])}, sweeps {_seeds(results['sweep_seeds'])}.",
        "",
    ]
    if results["missing_runs"]:
        parts += [f"**Not finished yet ({len(results['missing_runs'])}):** " + ", ".join(results["missing_runs"]), ""]
    if "main" in results:
        parts += ["## Main comparison (equal parameters, same tokens and recipe)", ""]
        parts += _table(("model", lambda r: r["label"]), ("params", "seeds", "ppl", "capacity_ppl", "layers", "mflops",
                        "ratio", "train_experts", "dropped", "train_tps", "inference_tps", "train_s"),
                        results["main"]["rows"])
        parts += _pairs(results["main"])
    if "threshold_train" in results:
        threshold = ("trained at t", lambda r: f"{r['threshold']:g}")
        parts += ["## Threshold sweep at training time (one model per t)", ""]
        parts += _table(threshold, ("seeds", "ppl", "capacity_ppl", "layers", "ratio", "train_experts", "lost",
                                    "inference_tps"), results["threshold_train"]["rows"])
        parts += ["## Threshold sweep at inference only (the models trained at t = 0.9, dropless)", ""]
        parts += _table(("evaluated at t", threshold[1]), ("models", "ppl", "layers", "ratio", "sweep_tps"),
                        results["threshold_inference"]["rows"])
    if "granularity" in results:
        parts += ["## Granularity sweep (XMoE t = 0.9, equal total parameters)", ""]
        parts += _table(("experts x width", lambda r: f"{r['num_experts']}x{r['expert_dim']}"),
                        ("seeds", "ppl", "capacity_ppl", "layers", "mflops", "ratio", "train_tps", "inference_tps"),
                        results["granularity"]["rows"])
    if results.get("plots"):
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in results["plots"]] + [""]
    parts += _settings(results)
    return "\n".join(parts)


def _pairs(main: dict) -> list[str]:
    """Row minus column of mean perplexity; * where the difference exceeds std_row + std_col."""
    labels = [r["label"] for r in main["rows"]]
    if len(labels) < 2:
        return []
    cell = {(p["a"], p["b"]): p for p in main["pairs"]}
    lines = [md_row(["row − column"] + labels), md_row(["---"] * (len(labels) + 1))]
    for a in labels:
        cells = []
        for b in labels:
            p = cell.get((a, b)) or cell.get((b, a))
            if p is None:
                cells.append("")
                continue
            diff = p["difference"] if (a, b) in cell else -p["difference"]
            cells.append(f"{diff:+.2f}" + ("*" if p["exceeds_spread"] else ""))
        lines.append(md_row([a] + cells))
    return ["Perplexity differences (row − column); `*`: larger than the spread, i.e. |difference| > "
            "std_row + std_col (mean ± std intervals do not overlap; not a significance test).", "", *lines, ""]


def _settings(results: dict) -> list[str]:
    env = results["environment"]
    common = results["common_overrides"]
    per_run = sorted({json.dumps({k: v for k, v in r["overrides"].items() if k not in common}, sort_keys=True)
                      for r in results["runs"].values()})
    return [
        "## Settings",
        "",
        f"Overrides common to every run (on top of each run's preset): `{json.dumps(common)}`",
        "",
        "Per-run overrides (besides the common ones):",
        "",
        *(f"- `{p}`" for p in per_run),
        "",
        f"Environment: Python {env['python']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"{env['cpu_count']} CPUs, {env['platform']}" + (f", GPU {env['cuda']}" if env["cuda"] else "") + ".",
        "Each run's full resolved config, its measurements and the load average when it started are in "
        "results.json (runs.NAME) and in its run folder.",
        "",
    ]


def _seeds(seeds: Sequence) -> str:
    return ", ".join(str(s) for s in seeds)
