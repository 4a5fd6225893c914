"""XMoE against top-k at the same compute: which top-k is compute-matched, speeds measured so
that load cannot invert them, and the closing table of `xmoe demo`.

A threshold router's experts per token is a measured number (2.04, say), a top-k router's an
integer. The compute-matched baselines are top-k over the same experts at the nearest integers
below and above the measured number (one k when it is within ``TOLERANCE`` of an integer):
the skeptic's comparison, not only the parameter-matched top-k of the paper.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from xmoe.moe import budget_dials

TOLERANCE = 0.05  # experts per token within this of an integer k: top-k alone is compute-matched
SPEED_ROUNDS = 5


def compute_matched_k(experts_per_token: float, num_experts: int) -> list[int]:
    """The k of the top-k models at XMoE's measured compute: floor and ceiling, or the nearest
    integer when within TOLERANCE of it; within 1..num_experts."""
    nearest = round(experts_per_token)
    if abs(experts_per_token - nearest) <= TOLERANCE:
        ks = [nearest]
    else:
        ks = [math.floor(experts_per_token), math.ceil(experts_per_token)]
    return sorted({min(max(k, 1), num_experts) for k in ks})


def interleaved_speeds(models: dict[str, nn.Module], batches: Sequence, *, rounds: int = SPEED_ROUNDS,
                       threads: int | None = 1) -> dict[str, dict[str, float]]:
    """Training (forward + backward of the LM loss) and inference tokens/s of each model on the
    same ``batches`` of (inputs, targets): round robin over the models, ``rounds`` rounds after a
    warm-up round, the median per model. Every model sees the same load in the same process, so
    a busy machine slows all of them alike instead of inverting the comparison. ``threads``:
    torch threads while measuring (one is steadiest on a shared machine; None keeps the
    setting). The models are left in eval mode, with no gradients and a budget's per-step counts
    reset to zero (call it between optimizer steps, where they are zero anyway)."""
    tokens = sum(y.numel() for _, y in batches)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    seconds = {name: {"train": [], "inference": []} for name in models}
    try:
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            for name, model in models.items():
                train_s, inference_s = _time_once(model, batches)
                if r:
                    seconds[name]["train"].append(train_s)
                    seconds[name]["inference"].append(inference_s)
    finally:
        torch.set_num_threads(before)
    return {name: {"train_tokens_per_s": tokens / statistics.median(s["train"]),
                   "inference_tokens_per_s": tokens / statistics.median(s["inference"])}
            for name, s in seconds.items()}


def _time_once(model: nn.Module, batches: Sequence) -> tuple[float, float]:
    model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        model(x, y).loss.backward()
    train_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    for dial in budget_dials(model):  # the timing steps are not training steps: t must not learn from them
        dial.reset_counts()
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, y in batches:
            model(x, y)
    return train_s, time.perf_counter() - t0


def describe_comparison(xmoe: tuple[str, dict], baselines: dict[str, dict], *, speeds: dict[str, dict],
                        flops_per_expert: float) -> str:
    """The closing table of `xmoe demo`: XMoE (``(label, LMEval.to_dict())``) and the top-k
    models at its compute (``{label: LMEval.to_dict()}``, on the same validation batches), with
    ``speeds`` (interleaved_speeds, keyed by label), and which is better at equal compute."""
    label, ev = xmoe
    rows = {label: ev, **baselines}

    def row(name: str, r: dict) -> str:
        s = speeds.get(name, {})
        return (f"| {name} | {r['perplexity']:.2f} | {r['experts_per_token']:.2f} | "
                f"{r['experts_per_token'] * flops_per_expert / 1e6:.2f} | {s.get('train_tokens_per_s', 0):.0f} | "
                f"{s.get('inference_tokens_per_s', 0):.0f} |")

    lines = ["XMoE against top-k at the same compute, trained on the same tokens (validation, dropless):", "",
             "| model | perplexity | experts/token | expert MFLOPs/token | train tok/s | inference tok/s |",
             "|---|---|---|---|---|---|", *(row(n, r) for n, r in rows.items()), ""]
    for name, r in baselines.items():
        gap = ev["perplexity"] / r["perplexity"] - 1
        compute = ev["experts_per_token"] / r["experts_per_token"]
        verdict = "XMoE better" if gap < 0 else f"{name} better" if gap > 0 else "a tie"
        lines.append(f"Against {name}: XMoE's perplexity is {abs(gap):.1%} {'lower' if gap < 0 else 'higher'} "
                     f"({verdict}), at {compute:.2f}x its expert FLOPs.")
    lines += ["Speeds: medians of rounds taken in turn in one process, one thread, so that load on the machine "
              "cannot invert them.",
              "One seed and a few hundred steps: docs/results.md (\"At the same compute\") has the study with 3 seeds "
              "and a held-out test split."]
    return "\n".join(lines)
