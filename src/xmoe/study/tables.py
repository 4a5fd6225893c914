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
from typing import Any, Sequence


def results_markdown(results: dict) -> str:
    parts = [
        f"# xmoe study `{results['study']}`: {results['scale']} scale",
        "",
        f"Corpus: {results['data']}. Scale: {results['scale_note']}"
        + (
            f", changed on the command line: `{json.dumps(results['user_overrides'])}`"
            if results["user_overrides"]
            else ""
        )
        + f". Seeds: main comparison {_seeds(results['seeds'])}, sweeps {_seeds(results['sweep_seeds'])}.",
        "",
    ]
    if results["missing_runs"]:
        parts += [f"**Not finished yet ({len(results['missing_runs'])}):** " + ", ".join(results["missing_runs"]), ""]
    if "main" in results:
        parts += _main(results["main"])
    if "threshold_train" in results:
        parts += _threshold(results["threshold_train"], results["threshold_inference"])
    if "granularity" in results:
        parts += _granularity(results["granularity"])
    if results.get("plots"):
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in results["plots"]] + [""]
    parts += _settings(results)
    return "\n".join(parts)


def _main(main: dict) -> list[str]:
    header = [
        "model",
        "params",
        "seeds",
        "val PPL",
        "val PPL, train capacity",
        "experts/token per MoE layer",
        "MoE MFLOPs/token",
        "vs top-k FLOPs",
        "train experts/token",
        "dropped pairs/token (train capacity)",
        "train tok/s",
        "inference tok/s",
        "train s",
    ]
    lines = _table(
        header,
        (
            [
                r["label"],
                f"{r['params'] / 1e6:.2f}M",
                str(r["n"]),
                _ms(r, "perplexity", ".2f"),
                _ms(r, "capacity_perplexity", ".2f"),
                _layers(r),
                _ms(r, "moe_flops_per_token", ".2f", 1e-6),
                _ms(r, "moe_flops_ratio", ".2f"),
                _ms(r, "train_experts_per_token", ".2f"),
                _ms(r, "dropped_pairs_per_token", ".3f"),
                _ms(r, "train_tokens_per_s", ",.0f"),
                _ms(r, "inference_tokens_per_s", ",.0f"),
                _ms(r, "train_seconds", ".0f"),
            ]
            for r in main["rows"]
        ),
    )
    return ["## Main comparison (equal parameters, same tokens and recipe)", ""] + lines + [""] + _pairs(main)


def _pairs(main: dict) -> list[str]:
    """Row minus column of mean perplexity; * where the difference exceeds std_row + std_col."""
    labels = [r["label"] for r in main["rows"]]
    if len(labels) < 2:
        return []
    cell = {(p["a"], p["b"]): p for p in main["pairs"]}
    lines = [_row(["row − column"] + labels), _row(["---"] * (len(labels) + 1))]
    for a in labels:
        cells = []
        for b in labels:
            p = cell.get((a, b)) or cell.get((b, a))
            if p is None:
                cells.append("")
                continue
            diff = p["difference"] if (a, b) in cell else -p["difference"]
            cells.append(f"{diff:+.2f}" + ("*" if p["exceeds_spread"] else ""))
        lines.append(_row([a] + cells))
    return (
        [
            "Perplexity differences (row − column); `*`: larger than the spread, i.e. |difference| > "
            "std_row + std_col (mean ± std intervals do not overlap; not a significance test).",
            "",
        ]
        + lines
        + [""]
    )


def _threshold(train: dict, inference: dict) -> list[str]:
    header = [
        "trained at t",
        "seeds",
        "val PPL",
        "val PPL, train capacity",
        "experts/token per MoE layer",
        "vs top-k FLOPs",
        "train experts/token",
        "train tokens that lost a pair",
        "inference tok/s",
    ]
    lines = _table(
        header,
        (
            [
                f"{r['threshold']:g}",
                str(r["n"]),
                _ms(r, "perplexity", ".2f"),
                _ms(r, "capacity_perplexity", ".2f"),
                _layers(r),
                _ms(r, "moe_flops_ratio", ".2f"),
                _ms(r, "train_experts_per_token", ".2f"),
                _ms(r, "train_dropped_token_fraction", ".3f"),
                _ms(r, "inference_tokens_per_s", ",.0f"),
            ]
            for r in train["rows"]
        ),
    )
    header = ["evaluated at t", "models", "val PPL", "experts/token per MoE layer", "vs top-k FLOPs", "inference tok/s"]
    inf = _table(
        header,
        (
            [
                f"{r['threshold']:g}",
                str(r["n"]),
                _ms(r, "perplexity", ".2f"),
                _layers(r),
                _ms(r, "moe_flops_ratio", ".2f"),
                _ms(r, "tokens_per_second", ",.0f"),  # an inference sweep's point (xmoe.sweep)
            ]
            for r in inference["rows"]
        ),
    )
    return (
        ["## Threshold sweep at training time (one model per t)", ""]
        + lines
        + [""]
        + ["## Threshold sweep at inference only (the models trained at t = 0.9, dropless)", ""]
        + inf
        + [""]
    )


def _granularity(gran: dict) -> list[str]:
    header = [
        "experts x width",
        "seeds",
        "val PPL",
        "val PPL, train capacity",
        "experts/token per MoE layer",
        "MoE MFLOPs/token",
        "vs top-k FLOPs",
        "train tok/s",
        "inference tok/s",
    ]
    lines = _table(
        header,
        (
            [
                f"{r['num_experts']}x{r['expert_dim']}",
                str(r["n"]),
                _ms(r, "perplexity", ".2f"),
                _ms(r, "capacity_perplexity", ".2f"),
                _layers(r),
                _ms(r, "moe_flops_per_token", ".2f", 1e-6),
                _ms(r, "moe_flops_ratio", ".2f"),
                _ms(r, "train_tokens_per_s", ",.0f"),
                _ms(r, "inference_tokens_per_s", ",.0f"),
            ]
            for r in gran["rows"]
        ),
    )
    return ["## Granularity sweep (XMoE t = 0.9, equal total parameters)", ""] + lines + [""]


def _settings(results: dict) -> list[str]:
    env = results["environment"]
    runs = results["runs"]
    per_run = sorted(
        {
            json.dumps(
                {k: v for k, v in r["overrides"].items() if k not in results["common_overrides"]}, sort_keys=True
            )
            for r in runs.values()
        }
    )
    return (
        [
            "## Settings",
            "",
            f"Overrides common to every run (on top of each run's preset): `{json.dumps(results['common_overrides'])}`",
            "",
            "Per-run overrides (besides the common ones):",
            "",
        ]
        + [f"- `{p}`" for p in per_run]
        + [
            "",
            f"Environment: Python {env['python']}, torch {env['torch']}, {env['torch_threads']} threads, "
            f"{env['cpu_count']} CPUs, {env['platform']}" + (f", GPU {env['cuda']}" if env["cuda"] else "") + ".",
            "Each run's full resolved config, its measurements and the load average when it started are in "
            "results.json (runs.NAME) and in its run folder.",
            "",
        ]
    )


def _ms(row: dict, key: str, spec: str, scale: float = 1.0) -> str:
    if key not in row:
        return "–"
    cell = row[key]
    text = format(cell["mean"] * scale, spec)
    return text if cell["std"] is None else f"{text} ± {format(cell['std'] * scale, spec)}"


def _layers(row: dict) -> str:
    layers = row.get("experts_per_token_layers")
    return " / ".join(f"{v:.2f}" for v in layers) if layers else "–"


def _seeds(seeds: Sequence[Any]) -> str:
    return ", ".join(str(s) for s in seeds)


def _table(header: Sequence[str], rows) -> list[str]:
    """Markdown lines: the header, its separator, then one line per row of cells."""
    return [_row(header), _row(["---"] * len(header))] + [_row(cells) for cells in rows]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
