"""Starting and resuming a run folder: the checks every task (LM, translation) makes before the
shared loop runs, so that ``--resume`` continues a run exactly or refuses with the reason.

    saved_state = begin_run(run_dir, resume=...)          # None for a new run
    check_resumable(saved_cfg, cfg, run_dir, saved_state=saved_state, ranks=...)
    check_same_data(saved_state, fingerprint, run_dir)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_dir
from .config import to_dict

# Fields a resume may change: they do not alter which batches come next or how steps update.
RESUMABLE_TRAIN_FIELDS = ("max_steps", "log_every", "eval_every", "eval_batches", "save_every", "device", "compile")


def begin_run(run_dir: Path, *, resume: bool) -> dict | None:
    """state.json of the checkpoint a resume continues; a new run must not overwrite one."""
    if resume:
        return json.loads((checkpoint_dir(run_dir) / "state.json").read_text())
    if (run_dir / "checkpoint").exists() or (run_dir / "checkpoint.previous").exists():
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, or choose another --out"
        )
    return None


def check_resumable(saved_cfg, cfg, run_dir: Path, *, saved_state: dict, ranks: int = 1,
                    also_resumable: tuple[str, ...] = ()) -> None:
    """A resume must replay the same micro-batches per step: the same config (bar the fields in
    RESUMABLE_TRAIN_FIELDS, ``model.vocab_size``, which the data sets, and ``also_resumable``:
    dotted names, or prefixes ending in "."), and the same ``grad_accum x ranks``; a run may move
    between numbers of processes if it keeps that product."""
    saved_ranks = saved_state.get("world_size", 1)
    saved_micro, micro = saved_cfg.train.grad_accum * saved_ranks, cfg.train.grad_accum * ranks
    if saved_micro != micro:
        hint = f"; with {ranks} rank(s) use --train.grad_accum={saved_micro // ranks}" if saved_micro % ranks == 0 else ""
        raise ValueError(
            f"--resume: {run_dir} took {saved_micro} micro-batches per step (train.grad_accum="
            f"{saved_cfg.train.grad_accum} x {saved_ranks} rank(s)); this run would take {micro} "
            f"(train.grad_accum={cfg.train.grad_accum} x {ranks} rank(s)), so the batches would differ{hint}"
        )
    free = {f"train.{name}" for name in RESUMABLE_TRAIN_FIELDS} | {"train.grad_accum", "model.vocab_size"}
    free |= set(also_resumable)
    old, new = _flatten(to_dict(saved_cfg)), _flatten(to_dict(cfg))
    changed = sorted(key for key in old.keys() | new.keys()
                     if old.get(key) != new.get(key) and not _matches(key, free))
    if changed:
        allowed = sorted({f"train.{name}" for name in RESUMABLE_TRAIN_FIELDS} | set(also_resumable))
        raise ValueError(
            f"--resume continues {run_dir} exactly, so these may not change: {', '.join(changed)}; "
            f"a resume may change only {', '.join(name + '*' if name.endswith('.') else name for name in allowed)}"
        )


def check_same_data(saved_state: dict | None, fingerprint: str, run_dir: Path, what: str) -> None:
    """Refuse a resume whose training text changed (it would train on other batches)."""
    if saved_state is not None and saved_state.get("data_fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"--resume: {what} changed since {run_dir} was trained; resuming would train on other "
            f"batches. Start a new run with --out"
        )


def _matches(key: str, names: set[str]) -> bool:
    return key in names or any(name.endswith(".") and key.startswith(name) for name in names)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
