"""Perplexity against the fraction of FFN FLOPs, for a list of thresholds: the compute dial of a
converted (or split-trained) model, for any model whose FFNs are XMoE layers (this project's GPT,
a converted Hugging Face model).

The fraction of FFN FLOPs is counted from the pairs the layers actually computed:

    fraction = sum_layers kept_pairs * flops_per_pair / sum_layers tokens * E * flops_per_pair

i.e. the share of the experts' FLOPs engaged, which for a dense FFN split into E equal experts is
the share of the dense FFN's FLOPs (routers, a D x E product per token and layer, excluded).

Shape legend: B sequences, L sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.extras import needs_extra
from xmoe.moe import MoELayer, set_threshold


@dataclass(frozen=True)
class SweepPoint:
    threshold: float | None  # None for the dense model
    loss: float
    ffn_flops_fraction: float  # engaged share of the FFN FLOPs (1.0 for the dense model)
    experts_per_token: float | None  # mean over layers and tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


class _PairCounter:
    """Forward hooks on every MoELayer that add up kept pairs and token slots, weighted by FLOPs."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.kept_flops = self.all_flops = self.kept_pairs = self.token_layers = 0.0
        self.handles = [m.register_forward_hook(self._record) for m in self.layers]

    def _record(self, layer: MoELayer, args, out) -> None:
        s = out.stats
        pair = layer.cfg.flops_per_pair
        kept = float(s.kept_per_token) * s.num_tokens
        self.kept_pairs += kept
        self.token_layers += s.num_tokens
        self.kept_flops += kept * pair
        self.all_flops += s.num_tokens * layer.experts.num_experts * pair

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate_point(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                   logits: Callable[[nn.Module, Tensor], Tensor], threshold: float | None = None) -> SweepPoint:
    """Mean next-token cross-entropy and engaged FFN FLOPs of ``model`` on ``batches`` of
    (inputs [B, L], targets [B, L]); ``logits(model, x_BL)`` gives [B, L, V]. With a threshold,
    every threshold router of the model is set to it first."""
    model.eval()
    if threshold is not None and set_threshold(model, threshold) == 0:
        raise UsageError("the model has no threshold-routed MoE layer to set a threshold on")
    device = next(model.parameters()).device
    counter = _PairCounter(model)
    total, count = 0.0, 0
    try:
        for x_BL, y_BL in batches:
            logits_BLV = logits(model, x_BL.to(device)).float()
            y_BL = y_BL.to(device)
            total += float(F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), y_BL.reshape(-1),
                                           reduction="sum"))
            count += y_BL.numel()
    finally:
        counter.remove()
    if count == 0:
        raise UsageError("the sweep got no evaluation batches: the text is shorter than one sequence")
    if not counter.layers:
        return SweepPoint(threshold, total / count, 1.0, None)
    per_token = counter.kept_pairs / counter.token_layers
    return SweepPoint(threshold, total / count, counter.kept_flops / counter.all_flops, per_token)


def sweep(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], thresholds: Sequence[float],
          logits: Callable[[nn.Module, Tensor], Tensor]) -> list[SweepPoint]:
    """``evaluate_point`` at each threshold (``batches`` is iterated once per threshold, so give a
    re-iterable such as a list or ValBatches). The model keeps the last threshold."""
    return [evaluate_point(model, batches, logits, t) for t in thresholds]


def gpt_logits(model: nn.Module, x_BL: Tensor) -> Tensor:
    """Logits of this project's GPT."""
    return model(x_BL).logits_BLV


def hf_logits(model: nn.Module, x_BL: Tensor) -> Tensor:
    """Logits of a Hugging Face causal LM."""
    return model(input_ids=x_BL).logits


def sweep_markdown(curves: dict[str, Sequence[SweepPoint]], dense: SweepPoint | None = None) -> str:
    """One markdown table: a row per (model, threshold), plus the dense reference."""
    lines = ["| model | threshold | FFN FLOPs fraction | experts/token | perplexity |", "|---|---|---|---|---|"]
    if dense is not None:
        lines.append(f"| dense | - | 1.000 | - | {dense.perplexity:.2f} |")
    for name, points in curves.items():
        for p in points:
            experts = "-" if p.experts_per_token is None else f"{p.experts_per_token:.2f}"
            lines.append(f"| {name} | {_t(p)} | {p.ffn_flops_fraction:.3f} | {experts} | {p.perplexity:.2f} |")
    return "\n".join(lines)


def _t(point: SweepPoint) -> str:
    """The threshold as a label; "-" for a point measured at the model's own setting."""
    return "-" if point.threshold is None else f"{point.threshold:g}"


def plot_sweeps(curves: dict[str, Sequence[SweepPoint]], path: str | os.PathLike,
                dense: SweepPoint | None = None) -> None:
    """Perplexity (y) against the fraction of FFN FLOPs (x), one line per model; the dense model
    as a horizontal line. PNG, drawn on a private Agg canvas (no pyplot state); needs matplotlib
    (``pip install 'xmoe[report]'``)."""
    with needs_extra("report", "the sweep plot"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p.ffn_flops_fraction)
        ax.plot([p.ffn_flops_fraction for p in pts], [p.perplexity for p in pts], marker="o", label=name)
        for p in pts:
            ax.annotate(_t(p), (p.ffn_flops_fraction, p.perplexity), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if dense is not None:
        ax.axhline(dense.perplexity, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("fraction of the dense FFN FLOPs engaged")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs FFN compute (labels: threshold t)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
