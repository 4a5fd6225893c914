"""The one way to open a checkpoint for inference: decide what it holds (xmoe.checkpoint_kind),
refuse a kind the command does not take, naming the command that takes it, and load it with
the loader of its kind (an xmoe run, a converted model, a Hugging Face folder or Hub id).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xmoe.checkpoint_kind import KINDS, Checkpoint, checkpoint_kind
from xmoe.errors import UsageError

# What to do with a kind a command does not take: the command that takes it.
_INSTEAD = {
    "converted": "evaluate it with: xmoe sweep-threshold --checkpoint {path} --data TEXT --thresholds T",
    "hf-dense": "make it sparse first: xmoe convert --checkpoint {path} --experts E --out NEW_FOLDER --data TEXT",
    "run": "give a Hugging Face folder, or export the run with: xmoe export-hf --checkpoint {path} --out FOLDER",
    "hf": "convert only takes a dense model; evaluate this one with: xmoe sweep-threshold --checkpoint {path} "
          "--data TEXT",
    "hub": "this command takes a local folder; download it first (hf download {path} --local-dir DIR)",
}


def expect(checkpoint: Checkpoint, takes: tuple[str, ...], command: str) -> None:
    """A UsageError unless ``checkpoint``'s kind is one of ``takes``, naming what it is and
    the command that takes it."""
    if checkpoint.kind not in takes:
        raise UsageError(f"{checkpoint.path} is {checkpoint.what}, which `xmoe {command}` does not take; "
                         + _INSTEAD[checkpoint.kind].format(path=checkpoint.path))


@dataclass
class Opened:
    """A checkpoint opened for inference: its model (eval mode, on ``device``) and, for an xmoe
    run, the run (config, run folder, tokenizer or vocabulary: xmoe.training.LoadedRun)."""

    checkpoint: Checkpoint
    model: Any
    run: Any = None


def open_checkpoint(path: str | os.PathLike | Checkpoint, *, device: str = "auto", task: str = "lm",
                    takes: tuple[str, ...] = KINDS, command: str = "eval") -> Opened:
    """Decide what ``path`` holds (once; or give the Checkpoint already decided), refuse a kind
    ``command`` does not take, and load it on ``device``.

    ``task``: what an xmoe run must be, "lm" (`xmoe train`) or "mt" (`xmoe train-mt`); a run of
    the other task is refused with the commands that take it."""
    checkpoint = path if isinstance(path, Checkpoint) else checkpoint_kind(path)
    expect(checkpoint, takes, command)
    if checkpoint.kind == "run":
        from xmoe.tasks.lm import load_lm
        from xmoe.tasks.mt import load_mt

        run = (load_mt if task == "mt" else load_lm)(checkpoint.path, device=device)
        return Opened(checkpoint, run.model, run)
    from xmoe.training.loop import resolve_device

    if checkpoint.kind == "converted":
        from xmoe.conversion.hf import load_converted

        return Opened(checkpoint, load_converted(checkpoint.path).to(resolve_device(device)))
    from xmoe.hf.folders import load_folder

    model, _ = load_folder(checkpoint.path, device=resolve_device(device))
    return Opened(checkpoint, model)


def set_threshold(model, threshold: float, checkpoint) -> None:
    """--threshold: t of every threshold router of ``model`` (the checkpoint's) set at inference."""
    from xmoe import moe

    try:
        if moe.set_threshold(model, threshold) == 0:
            raise UsageError(f"--threshold: {checkpoint} has no threshold-routed MoE layer")
    except UsageError:
        raise
    except ValueError as err:  # xmoe.moe's check of t
        raise UsageError(f"--threshold {threshold}: {err}") from None


@contextlib.contextmanager
def training_capacity(model) -> Iterator[None]:
    """Evaluate with each MoE layer's training capacity factor instead of dropless (--capacity);
    each layer's dial is put back afterwards."""
    from xmoe.moe import MoELayer

    dials = [(m.router.dial, m.router.cfg.capacity_factor) for m in model.modules() if isinstance(m, MoELayer)]
    saved = [dial.eval_capacity_factor for dial, _ in dials]
    try:
        for dial, factor in dials:
            dial.eval_capacity_factor = factor
        yield
    finally:
        for (dial, _), factor in zip(dials, saved):
            dial.eval_capacity_factor = factor


def has_capacity(model) -> bool:
    """Whether any MoE layer of ``model`` was trained with a capacity factor (one --capacity uses)."""
    from xmoe.moe import MoELayer

    return any(m.router.cfg.capacity_factor is not None for m in model.modules() if isinstance(m, MoELayer))
