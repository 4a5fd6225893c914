"""The compute dial swept: perplexity against expert FLOPs at several thresholds t, for every kind
of model xmoe evaluates (an `xmoe train` run, a converted dense model, a Hugging Face MoE folder,
the demo, the studies). One point type, one loop, one table, one plot, one file.

A point is the model evaluated at one setting of its dial:

    perplexity          exp(mean next-token cross-entropy) on the evaluation text
    experts_per_token   mean over tokens and MoE layers (kept pairs: evaluation is dropless)
    moe_flops_ratio     expert FLOPs engaged per token / the baseline's, summed over MoE layers:
                        sum kept_pairs * flops_per_pair / sum tokens * min(top_k, E) * flops_per_pair

The baseline (ratio 1) is the top-k model of equal parameters, or, for a dense FFN split into E
experts (top_k = E: `xmoe convert`, the split8-* presets), that dense FFN: XMoE's "over 50% less
computation" (Yang et al. 2024, Sec. 4) is a ratio below 1 at similar perplexity.

How a point is measured depends on the model (``xmoe.tasks.lm.evaluate_lm`` for a run, forward
hooks on MoE layers here, transformers' routers in xmoe.hf.folders); the caller passes it to
``sweep`` as ``measure``, with ``dial`` to turn t. matplotlib (``pip install 'xmoe[report]'``) is
imported only to draw, on a private Agg canvas (no pyplot state).

Shape legend: B sequences, L sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.extras import MissingExtra, needs_extra
from xmoe.markdown import finite, fmt, md_table
from xmoe.moe import MoELayer
from xmoe.training.metrics import perplexity

SWEEP_STEM = "threshold_sweep"  # + "_<data file stem>" for a sweep on other text than a run's own
BASELINES = ("top-k", "dense")


@dataclass(frozen=True)
class SweepPoint:
    """The model at one setting of its dial (see the module docstring for each number)."""

    threshold: float | None  # None: the model as loaded (its own top-k, or t as trained)
    perplexity: float
    moe_flops_ratio: float
    experts_per_token: float | None = None  # None: no MoE layer
    experts_per_token_layers: tuple[float, ...] | None = None  # per MoE layer
    loss: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None  # forward passes, timed in this process
    routing: str | None = None  # how it routed when that is more than "t": "top-2 (the model's own)"
    histogram: tuple[int, ...] | None = None  # histogram[n]: (token, layer) pairs that engaged n experts

    @property
    def label(self) -> str:
        """t, or how the model routed when that says more (or it ran as loaded)."""
        return self.routing or ("as loaded" if self.threshold is None else f"{self.threshold:g}")

    def to_dict(self) -> dict:
        """The point as a JSON row (the fields that were measured)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v is not None}

    @classmethod
    def from_dict(cls, row: dict, index: int = 0) -> SweepPoint:
        """A point from a JSON row; a UsageError naming the row when a required number is missing."""
        missing = [k for k in ("perplexity", "moe_flops_ratio") if not finite(row.get(k))]
        if row.get("threshold") is not None and not finite(row["threshold"]):
            missing.insert(0, "threshold")
        if missing:
            raise UsageError(f"threshold sweep row {index} needs numbers for {missing}, got {row!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in row.items() if k in names}
        for name in ("histogram", "experts_per_token_layers"):
            if known.get(name) is not None:
                known[name] = tuple(known[name])
        return cls(**{"threshold": None, **known})


def point_from_eval(summary: dict, threshold: float | None, **measured) -> SweepPoint:
    """The point of an evaluation of an xmoe model (``LMEval.to_dict()``)."""
    layers = tuple(layer["experts_per_token"] for layer in summary["layers"]) if "layers" in summary else None
    return SweepPoint(threshold=threshold, perplexity=summary["perplexity"],
                      moe_flops_ratio=summary.get("moe_flops_ratio", 1.0),
                      experts_per_token=summary.get("experts_per_token"), experts_per_token_layers=layers,
                      loss=summary["loss"], tokens=summary["tokens"], **measured)


def sweep(thresholds: Iterable[float], measure: Callable[[], SweepPoint],
          dial: Callable[[float], str | None]) -> list[SweepPoint]:
    """``measure()`` after ``dial(t)`` for each t; ``dial`` turns the model's dial and returns how
    it routes now when that says more than t (e.g. "t=0.7, at most 4"), else None. The model
    keeps the last t."""
    points = []
    for t in thresholds:
        routing = dial(t)
        points.append(dataclasses.replace(measure(), threshold=t, routing=routing))
    return points


# --- measuring a model built from xmoe.moe.MoELayer -----------------------------------------------


class LayerCounts:
    """Forward hooks on every MoELayer of a model that add up kept pairs, token slots and the
    histogram of experts per token, the pairs weighted by their FLOPs (a ``with`` block)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.kept_flops = self.budget_flops = self.kept_pairs = self.token_layers = 0.0
        self.histogram = [0] * (self.layers[0].cfg.num_experts + 1 if self.layers else 1)
        self._handles: list = []

    def _record(self, layer: MoELayer, _inputs, out) -> None:
        s, cfg = out.stats, layer.cfg
        kept = float(s.kept_per_token) * s.num_tokens
        self.kept_pairs += kept
        self.token_layers += s.num_tokens
        self.kept_flops += kept * cfg.flops_per_pair
        self.budget_flops += s.num_tokens * min(cfg.top_k, cfg.num_experts) * cfg.flops_per_pair
        for n, count in enumerate(s.kept_histogram.tolist()):
            self.histogram[n] += int(count)

    def __enter__(self) -> LayerCounts:
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def point(self, threshold: float | None, loss: float, tokens: int, **measured) -> SweepPoint:
        if not self.layers:
            return SweepPoint(threshold, perplexity(loss), 1.0, loss=loss, tokens=tokens, **measured)
        return SweepPoint(threshold, perplexity(loss), self.kept_flops / self.budget_flops,
                          experts_per_token=self.kept_pairs / self.token_layers, loss=loss, tokens=tokens,
                          histogram=tuple(self.histogram), **measured)


def threshold_dial(model: nn.Module) -> Callable[[float], None]:
    """A ``dial`` for ``sweep``: sets t on every threshold router of ``model`` (a UsageError if
    it has none)."""
    from xmoe.moe import set_threshold

    def turn(threshold: float) -> None:
        if set_threshold(model, threshold) == 0:
            raise UsageError("the model has no threshold-routed MoE layer to set a threshold on")

    return turn


@torch.no_grad()
def measure_layers(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                   logits: Callable[[nn.Module, Tensor], Tensor]) -> SweepPoint:
    """Mean next-token cross-entropy and engaged expert FLOPs of ``model`` as its dial is set
    (any model whose MoE layers are MoELayers: this project's GPT, a converted Hugging Face
    model) on ``batches`` of (inputs [B, L], targets [B, L]); ``logits(model, x_BL)`` gives
    [B, L, V]. ``batches`` is iterated once: give a list to measure it again."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with LayerCounts(model) as counts:
        for x_BL, y_BL in batches:
            logits_BLV = logits(model, x_BL.to(device)).float()
            y_BL = y_BL.to(device)
            total += float(F.cross_entropy(logits_BLV.flatten(0, 1), y_BL.flatten(), reduction="sum"))
            count += y_BL.numel()
    if count == 0:
        raise UsageError("the sweep got no evaluation batches: the text is shorter than one sequence")
    return counts.point(None, total / count, count)


def gpt_logits(model: nn.Module, x_BL: Tensor) -> Tensor:
    """Logits of this project's GPT."""
    return model(x_BL).logits_BLV


def hf_logits(model: nn.Module, x_BL: Tensor) -> Tensor:
    """Logits of a Hugging Face causal LM."""
    return model(input_ids=x_BL).logits


# --- table, plot, files ---------------------------------------------------------------------------


def _points(rows: Sequence[SweepPoint | dict]) -> list[SweepPoint]:
    if not rows:
        raise UsageError("the threshold sweep has no rows; give at least one threshold")
    return [r if isinstance(r, SweepPoint) else SweepPoint.from_dict(r, i) for i, r in enumerate(rows)]


def sweep_table(rows: Sequence[SweepPoint | dict]) -> str:
    """A markdown table, one row per point (the model as loaded first, then ascending t); the
    experts, tokens/s and histogram columns appear when some point has them."""
    points = sorted(_points(rows), key=lambda p: (p.threshold is not None, p.threshold or 0.0))
    columns = [("t", lambda p: p.label)]
    if any(p.experts_per_token is not None for p in points):
        columns.append(("experts/token", lambda p: fmt(p.experts_per_token, ".2f")))
    columns += [("MoE FLOPs ratio", lambda p: f"{p.moe_flops_ratio:.3f}"),
                ("perplexity", lambda p: f"{p.perplexity:.2f}")]
    if any(p.tokens_per_second is not None for p in points):
        columns.append(("tokens/s", lambda p: fmt(p.tokens_per_second, ".0f")))
    if any(p.histogram for p in points):
        columns.append(("share of tokens with 1, 2, ... experts", _histogram))
    header, cells = zip(*columns)
    return "\n".join(md_table(header, ([cell(p) for cell in cells] for p in points)))


def _histogram(point: SweepPoint) -> str:
    if not point.histogram:
        return "-"
    last = max((n for n, c in enumerate(point.histogram) if c), default=0)
    total = sum(point.histogram) or 1
    return " ".join(f"{c / total:.2f}" for c in point.histogram[1:last + 1])


def threshold_sweep_figure(curves: Sequence[SweepPoint | dict] | dict[str, Sequence[SweepPoint | dict]], *,
                           baseline: str = "top-k", data: str = "the validation text",
                           dense_perplexity: float | None = None):
    """Perplexity on ``data`` against the MoE FLOPs ratio, one line per model of ``curves`` ({name:
    points}, or one model's points), each point labelled with its t (and experts per token).

    ``baseline``: what ratio 1 is, "top-k" (the top-k model of equal parameters) or "dense" (the
    dense FFN the experts were split from, whose perplexity, ``dense_perplexity`` or the t >= 1
    point's, is drawn as a horizontal line). A matplotlib Figure."""
    if baseline not in BASELINES:
        raise UsageError(f"baseline must be 'top-k' or 'dense', got {baseline!r}")
    if not isinstance(curves, dict):
        curves = {"threshold router": curves}
    curves = {name: sorted(_points(points), key=lambda p: p.moe_flops_ratio) for name, points in curves.items()}
    with needs_extra("report", "the threshold sweep plot"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in curves.items():
        ax.plot([p.moe_flops_ratio for p in points], [p.perplexity for p in points], "-o", label=name)
        for i, p in enumerate(points):
            label = p.label if p.routing or p.threshold is None else f"t={p.label}"
            if p.experts_per_token is not None:
                label += f"\n{p.experts_per_token:.2f} exp/tok"
            # Neighbours alternate above and below the line, so close points (t = 0.95, 1) stay legible.
            ax.annotate(label, (p.moe_flops_ratio, p.perplexity), textcoords="offset points",
                        xytext=(6, 6 if i % 2 == 0 else -22), fontsize=8)
    reference = "dense FFN" if baseline == "dense" else "top-k model"
    ax.axvline(1.0, color="tab:red", linestyle="--", linewidth=1, label=f"{reference}'s FLOPs (ratio 1)")
    if baseline == "dense" and dense_perplexity is None:
        at_one = [p.perplexity for points in curves.values() for p in points if (p.threshold or 0) >= 1]
        dense_perplexity = at_one[0] if at_one else None
    if dense_perplexity is not None:
        ax.axhline(dense_perplexity, color="gray", linestyle=":", linewidth=1,
                   label=f"dense model (t = 1): {dense_perplexity:.2f}")
    ax.set_title("Threshold sweep: perplexity vs expert compute")
    ax.set_xlabel("MoE FLOPs per token / " + ("the dense FFN's" if baseline == "dense"
                                              else "top-k model of equal parameters"))
    ax.set_ylabel(f"perplexity on {data}")
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_threshold_sweep(curves, path: str | os.PathLike, *, baseline: str = "top-k",
                         data: str = "the validation text", dense_perplexity: float | None = None) -> Path:
    """``threshold_sweep_figure`` saved as a PNG at ``path``."""
    fig = threshold_sweep_figure(curves, baseline=baseline, data=data, dense_perplexity=dense_perplexity)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def sweep_record(points: Sequence[SweepPoint | dict], *, data: str, step: int | None, baseline: str) -> dict:
    """What threshold_sweep*.json holds: the points, the text they were measured on (``data``)
    and the checkpoint's step (None for a model without one), so a sweep is never mistaken for another."""
    return {"data": data, "step": step, "baseline": baseline, "rows": [p.to_dict() for p in _points(points)]}


def sweep_name(data_path: str | os.PathLike | None) -> str:
    """threshold_sweep (a run's own validation text) or threshold_sweep_<stem> (other text)."""
    if data_path is None:
        return SWEEP_STEM
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(data_path).stem) or "data"
    return f"{SWEEP_STEM}_{stem}"


def write_sweep(points: Sequence[SweepPoint], out: str | os.PathLike, *, data: str | os.PathLike | None,
                step: int | None, baseline: str) -> Path:
    """The sweep's table on stdout, and its JSON record and plot in the folder ``out``, named by
    the text (``data``: a file, or None for a run's validation text; ``sweep_name``) so a sweep
    on other text never overwrites the model's own. Without matplotlib the plot is skipped with
    a warning: the table and the JSON are the result. Returns the JSON's path."""
    text = "the validation text" if data is None else repr(str(data))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = sweep_name(data)
    print(sweep_table(points))
    path = out / f"{name}.json"
    path.write_text(json.dumps(sweep_record(points, data=text, step=step, baseline=baseline), indent=2))
    try:
        plot_threshold_sweep(points, out / f"{name}.png", baseline=baseline, data=text)
        print(f"plot: {out / name}.png")
    except MissingExtra as err:
        warnings.warn(f"{err}; no plot drawn", stacklevel=2)
    print(f"json: {path}")
    return path


def read_sweeps(folder: str | os.PathLike) -> dict[str, dict]:
    """The sweep records (``sweep_record``) saved in ``folder``, by file name; unreadable files
    and files in another format are left out."""
    sweeps = {}
    for path in sorted(Path(folder).glob(f"{SWEEP_STEM}*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if isinstance(record, dict) and isinstance(record.get("rows"), list) and record["rows"]:
            sweeps[path.name] = record
    return sweeps

