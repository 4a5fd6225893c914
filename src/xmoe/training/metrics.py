"""The run's metrics log, metrics.jsonl: one JSON object per line, each a train row (logged every
``train.log_every`` steps) or a val row (an evaluation, with its routing: ``routing_summary``),
with its ``step``. The training loop writes it; reports and studies read it. Nothing here draws or
formats (that is xmoe.report).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from xmoe.checkpoint_kind import runs_inside_hint
from xmoe.errors import UsageError

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """JSON lines, one row per log event; a resume drops the rows after its checkpoint.

    Scalars also go to TensorBoard (RUN/tensorboard) when the ``tensorboard`` package is installed.
    """

    def __init__(self, path: Path, keep_before: int = 0) -> None:
        self.path = path
        if path.is_dir():
            raise UsageError(f"{path} is a folder, not the run's metrics log (a file); move it away, then run again")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(path) if keep_before and path.exists() else []
        with open(path, "w") as f:
            for row in rows:
                if row["step"] <= keep_before:
                    f.write(json.dumps(row) + "\n")
        self.board = _tensorboard(path.parent / "tensorboard", purge_step=keep_before + 1 if keep_before else None)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(f"{row['split']}/{key}", value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class NoLog:
    """The metrics log of a rank that does not write (all but rank 0)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(folder: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)  # a resume drops the later events


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy), capped at exp(50) so that a diverged loss still prints a number."""
    return math.exp(min(loss, 50.0))


def routing_summary(layers: Sequence, flops_per_token: float, topk_flops_per_token: float) -> dict:
    """An evaluation's routing, as both tasks report it: experts per token (mean over the MoE
    layers), expert FLOPs per token against the top-k model of equal parameters, and each
    layer's summary (``layers``: a RoutingSummary per MoE layer). Empty for a dense model."""
    if not layers:
        return {}
    per_layer = [layer.to_dict() for layer in layers]
    return {"experts_per_token": sum(layer["experts_per_token"] for layer in per_layer) / len(per_layer),
            "moe_flops_per_token": flops_per_token, "topk_moe_flops_per_token": topk_flops_per_token,
            "moe_flops_ratio": flops_per_token / topk_flops_per_token, "layers": per_layer}


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; errors name the file (and the line) and say what to do."""
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; give the folder `xmoe train --out` wrote"
                                f"{runs_inside_hint(path.parent)}")
    rows = read_metrics(path)
    if not rows:
        raise UsageError(f"{path} has no rows; the run logged nothing yet (train at least one step)")
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
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


__all__ = ["METRICS_FILE", "MetricsLog", "NoLog", "read_metrics", "read_rows", "routing_summary", "split_rows"]
