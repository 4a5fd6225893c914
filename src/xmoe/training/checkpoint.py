"""Checkpoints: safetensors weights + optimizer + RNG + step + the resolved config, atomically.

Layout of ``RUN/checkpoint/``:

    model.safetensors   weights (tied tensors stored once)
    optimizer.pt        optimizer state (torch.save, read back with weights_only=True)
    rng.pt              torch CPU (and CUDA) RNG states, for an exact resume
    state.json          {"step": ...}: the next step to run; batches are a function of it
    config.json         the resolved run config: `xmoe eval --checkpoint RUN` needs no flags

A checkpoint is written to a temporary folder beside the target and then renamed into place,
so a crash mid-write never destroys the previous one; ``load`` falls back to the previous one
if a crash fell between the two renames.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

MODEL_FILE = "model.safetensors"
REQUIRED = (MODEL_FILE, "state.json", "config.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or made for another model."""


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder for a run folder or a checkpoint folder."""
    path = Path(path)
    for candidate in (path / "checkpoint", path, path / "checkpoint.previous"):
        if (candidate / "state.json").is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist; train one with `xmoe train --out {path}`")
    raise CheckpointError(f"no checkpoint in {path}: expected {path}/checkpoint/state.json (written by `xmoe train`)")


def save_checkpoint(run_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, config: dict, extra: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "checkpoint"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        save_model(_unwrap(model), str(tmp / MODEL_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():  # not is_available(): that would start CUDA in a CPU run
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        _write_json(tmp / "state.json", {"step": step, **(extra or {})})
        _write_json(tmp / "config.json", config)
        for file in tmp.iterdir():  # on disk before the rename makes them the checkpoint
            _fsync(file)
        previous = run_dir / "checkpoint.previous"
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
        tmp.rename(target)
        _fsync(run_dir)  # the renames too, before the fallback is deleted
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_config(path: str | os.PathLike) -> dict:
    return _read_json(checkpoint_dir(path) / "config.json")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = False) -> dict:
    """Load weights (and optimizer, RNG) into ``model``; returns state.json's contents."""
    folder = checkpoint_dir(path)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    try:
        tensors = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {folder / MODEL_FILE} are corrupted or unreadable: {err}") from err
    _load_weights(_unwrap(model), tensors, folder)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint {folder} has no optimizer.pt, so the run cannot be resumed") from err
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"optimizer state in {folder} does not fit this model: {err}") from err
    if restore_rng:
        rng = torch.load(folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return _read_json(folder / "state.json")


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    # Tied parameters are stored once, under one of their names.
    aliases = {name for name, t in expected.items() if name not in tensors and any(
        t.data_ptr() == other.data_ptr() for other_name, other in expected.items() if other_name in tensors)}
    missing = sorted(set(expected) - set(tensors) - aliases)
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{n}: checkpoint {tuple(tensors[n].shape)} vs model {tuple(expected[n].shape)}"
                  for n in tensors if n in expected and tensors[n].shape != expected[n].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(filter(None, [
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
            f"shape mismatch {', '.join(mismatched[:5])}" if mismatched else "",
        ]))
        raise CheckpointError(
            f"checkpoint {folder} does not match this model ({details}); it was made with another "
            f"config: load it with the config.json saved beside it"
        )
    model.load_state_dict(tensors, strict=False)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file {path} is corrupted (not JSON: {err})") from err
