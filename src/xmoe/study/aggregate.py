"""From per-run measurements to the study's tables: means and spreads over seeds, and which
differences are larger than the spread.

Spread: the sample standard deviation over seeds (n - 1 in the denominator; undefined for one
seed). A difference of two means "exceeds the spread" when |mean_a - mean_b| > std_a + std_b,
i.e. the mean ± std intervals do not overlap: a plain, conservative rule at 3 seeds, not a
significance test (say so wherever it is used).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from xmoe.errors import UsageError

# Numbers averaged over seeds for every table row (missing keys, e.g. routing of a dense model, skip).
SUMMARY_KEYS = ("perplexity", "capacity_perplexity", "experts_per_token", "moe_flops_per_token", "moe_flops_ratio",
                "train_tokens_per_s", "inference_tokens_per_s", "train_experts_per_token",
                "train_dropped_token_fraction", "dropped_pairs_per_token", "train_seconds",
                "tokens_per_second")  # the last: an inference sweep's point (xmoe.sweep.SweepPoint)


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n", "values"}``; std is the sample standard deviation (None if n < 2)."""
    values = [float(v) for v in values]
    if not values:
        raise UsageError("mean_std needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def spread_cell(cell: dict | None, spec: str = ".2f", scale: float = 1.0) -> str:
    """A table cell of a ``mean_std`` dict: "mean ± std", the mean alone for one value, "–" for
    None (not measured). ``scale`` multiplies both (1e-6 for MFLOPs); a "+" in ``spec`` signs the mean."""
    if cell is None:
        return "–"
    text = format(cell["mean"] * scale, spec)
    return text if cell["std"] is None else f"{text} ± {format(cell['std'] * scale, spec.lstrip('+'))}"


def exceeds_spread(a: dict, b: dict) -> bool | None:
    """Whether the means of ``a`` and ``b`` (mean_std dicts) differ by more than std_a + std_b;
    None when either has a single value (no spread to compare with)."""
    if a["std"] is None or b["std"] is None:
        return None
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def flat(m: dict) -> dict:
    """The numbers of one run that the tables aggregate (capacity-eval drops lifted up)."""
    out = {k: m[k] for k in SUMMARY_KEYS if k in m}
    if "capacity_eval" in m:
        out["dropped_pairs_per_token"] = m["capacity_eval"]["dropped_pairs_per_token"]
        out["capacity_perplexity"] = m["capacity_eval"]["perplexity"]
    return out


def summarize(label: str, runs: Sequence[dict], **extra: Any) -> dict:
    """One table row: ``label``, the seeds' per-layer experts/token, and mean_std of each number."""
    if not runs:
        raise UsageError(f"no finished runs for {label}")
    row: dict[str, Any] = {"label": label, **extra, "n": len(runs)}
    if "params" in runs[0]:
        row["params"] = runs[0]["params"]
    flats = [flat(m) for m in runs]
    for key in SUMMARY_KEYS:
        if all(key in f for f in flats):
            row[key] = mean_std([f[key] for f in flats])
    if "experts_per_token_layers" in runs[0]:
        layers = zip(*(m["experts_per_token_layers"] for m in runs))
        row["experts_per_token_layers"] = [math.fsum(vals) / len(runs) for vals in layers]
    return row


def pairwise(rows: Sequence[dict], key: str = "perplexity") -> list[dict]:
    """Every pair of rows: difference of means of ``key`` (a - b) and whether it exceeds the spread."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            out.append({"a": a["label"], "b": b["label"], "difference": a[key]["mean"] - b[key]["mean"],
                        "spread": None if exceeds_spread(a[key], b[key]) is None else a[key]["std"] + b[key]["std"],
                        "exceeds_spread": exceeds_spread(a[key], b[key])})
    return out
