"""Accuracy on real tasks against compute: EleutherAI's lm-evaluation-harness run on one model at
several thresholds (``xmoe lm-eval``; needs ``pip install 'xmoe[lmeval]'``).

Perplexity on a text says little about what the dial costs on the tasks users care about. This
runs harness tasks (its registry, or task YAML files of your own through ``include_path``) on the
model as loaded and then at each threshold, and records per point the task metrics, the experts
per token and the MoE FLOPs per token, all counted over the tokens the harness fed the model:

    experts per token  = kept (token, MoE layer) pairs / (token, MoE layer) slots
    MoE FLOPs / token  = experts per token x MoE layers x FLOPs of one expert on one token

where one expert's FLOPs are 2 per multiply-add over its weight matrices (biases and the routers'
D x E products left out). The harness pads the sequences of a batch; pads would be routed and
counted, so the default batch size is 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from xmoe.checkpoint_kind import XMOE_MODEL_TYPES
from xmoe.data.files import atomic_write_text
from xmoe.errors import UsageError
from xmoe.extras import needs_extra
from xmoe.markdown import md_row

from .adaptive import histogram_mean, moe_blocks
from .folders import count_experts, set_dial


@dataclass(frozen=True)
class TaskPoint:
    routing: str  # "top-8 (the model's own)", "t=0.5", "t=0.5, at most 4"
    threshold: float | None
    experts_per_token: float  # mean over the (token, MoE layer) pairs the harness fed
    moe_flops_per_token: float  # experts per token x MoE layers x one expert's FLOPs on one token
    scores: dict[str, dict[str, float]]  # task -> metric -> value, as the harness reports them

    def to_dict(self) -> dict:
        return asdict(self)


def expert_flops(model: nn.Module) -> tuple[int, int]:
    """(MoE layers, forward FLOPs of one expert on one token) of ``model``."""
    if model.config.model_type in XMOE_MODEL_TYPES:
        layers = model.moe_layers()
        return len(layers), layers[0].cfg.flops_per_pair if layers else 0
    blocks = moe_blocks(model)
    if not blocks:
        raise UsageError(f"found no MoE block in {type(model).__name__} to count expert FLOPs of")
    matrices = [p for p in blocks[0].experts.parameters() if p.dim() == 3]  # [E, ., .] each; biases are 2-D
    return len(blocks), 2 * sum(p.numel() for p in matrices) // matrices[0].shape[0]


def run_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], thresholds: Sequence[float], *,
              max_experts: int | None = None, limit: int | float | None = None, num_fewshot: int | None = None,
              include_path: str | os.PathLike | None = None, batch_size: int = 1,
              log_samples: bool = False) -> tuple[list[TaskPoint], list[dict]]:
    """The model as loaded, then at each threshold: one TaskPoint each, and the harness's full
    results (with per-sample records when ``log_samples``) in the same order."""
    with needs_extra("lmeval", "lm-evaluation-harness tasks"):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

    if not tasks:
        raise UsageError("--tasks: name at least one lm-evaluation-harness task (e.g. hellaswag, or a task of "
                         "your own in a YAML file under --include-path)")
    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (add your own with --include-path DIR)"
        raise UsageError(f"--tasks: no lm-evaluation-harness task named {', '.join(map(repr, unknown))} in its "
                         f"registry{where}")
    device = next(model.parameters()).device
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    layers, flops_per_pair = expert_flops(model)
    points, results = [], []
    for threshold in [None, *thresholds]:
        routing = set_dial(model, threshold, max_experts if threshold is not None else None)
        with torch.no_grad(), count_experts(model) as counts, _task_data_reachable(tasks):
            result = simple_evaluate(model=harness_model, tasks=list(tasks), task_manager=task_manager,
                                     limit=limit, num_fewshot=num_fewshot, log_samples=log_samples)
        scores = {task: _metrics(values) for task, values in result["results"].items()}
        mean = histogram_mean(counts.histogram)
        points.append(TaskPoint(routing=routing, threshold=threshold, experts_per_token=mean,
                                moe_flops_per_token=mean * layers * flops_per_pair, scores=scores))
        results.append(result)
    return points, results


@contextmanager
def _task_data_reachable(tasks: Sequence[str]):
    """A task whose data set is not cached and cannot be downloaded (no network, or HF_HUB_OFFLINE)
    as a UsageError: the harness's `datasets` raises ConnectionError, deep in its own stack."""
    try:
        yield
    except ConnectionError as error:
        raise UsageError(f"--tasks {' '.join(tasks)}: the harness could not download a task's data set ({error}); "
                         "run it once where the Hugging Face Hub is reachable (the data is then cached), or write "
                         "a task whose data is a local file and pass its folder with --include-path") from error


def _metrics(values: dict) -> dict[str, float]:
    """The harness's "acc,none": 0.5 entries as {"acc": 0.5}; standard errors and names left out."""
    out = {}
    for key, value in values.items():
        metric, _, _filter = key.partition(",")
        if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "sample_len":
            out[metric if _filter in ("", "none") else key] = float(value)
    return out


def points_table(points: Sequence[TaskPoint]) -> str:
    """A markdown table: one row per point, one column per (task, metric)."""
    columns = sorted({(task, metric) for p in points for task, metrics in p.scores.items() for metric in metrics})
    header = ["routing", "experts/token", "MoE MFLOPs/token", *(f"{task} {metric}" for task, metric in columns)]
    rows = [md_row(header), md_row(["---"] * len(header))]
    for p in points:
        cells = [p.routing, f"{p.experts_per_token:.2f}", f"{p.moe_flops_per_token / 1e6:.3f}",
                 *(f"{p.scores.get(task, {}).get(metric, float('nan')):.4f}" for task, metric in columns)]
        rows.append(md_row(cells))
    return "\n".join(rows)


def write_points(points: Sequence[TaskPoint], out: str | os.PathLike) -> Path:
    """``lm_eval.json`` and ``lm_eval.md`` in ``out`` (made if missing); each file is written whole
    to a temporary name first, so an interrupted run leaves the earlier files as they were."""
    out = Path(out)
    atomic_write_text(out / "lm_eval.json", json.dumps([p.to_dict() for p in points], indent=2))
    atomic_write_text(out / "lm_eval.md", points_table(points) + "\n")
    return out / "lm_eval.json"
