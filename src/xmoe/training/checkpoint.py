"""Checkpoints: safetensors weights + optimizer + RNG + step + the resolved config, atomically.

Layout of ``RUN/checkpoint/``:

    model.safetensors   weights (tied tensors stored once)
    optimizer.pt        optimizer state (torch.save, read back with weights_only=True)
    rng.pt              torch CPU (and CUDA) RNG states, for an exact resume (one CPU state per
                        rank in a distributed run)
    state.json          {"step": ...}: the next step to run; batches are a function of it
    config.json         the resolved run config: `xmoe eval --checkpoint RUN` needs no flags
    manifest.json       sha256 and size of each file above (written last)

Verification: safetensors and torch.save carry no checksum, so a flipped bit would load
silently. ``load_checkpoint`` checks each file it reads against manifest.json and refuses with
the file named; the weights also carry the sha256 of their config.json in their safetensors
header, so weights copied in from another run (even with the same shapes) are refused too.
Cost: one sha256 pass (``hashlib``) over each file read or written, small beside the write or
read itself (measured in benchmarks/README.md, "Checkpoint checksums").
Checkpoints written before manifests existed load with a warning.

A checkpoint is written to a temporary folder beside the target and then renamed into place,
so a crash mid-write never destroys the previous one; ``load`` falls back to the previous one
if a crash fell between the two renames.

A distributed run saves the same layout: expert shards are gathered first (see
xmoe.distributed), so a checkpoint never depends on the number of ranks that wrote it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CONFIG_HASH_KEY = "xmoe_config_sha256"  # in the safetensors header of the weights
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


def save_checkpoint(run_dir: str | os.PathLike, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, step: int, config: dict,
                    extra: dict | None = None, model_state: dict[str, Tensor] | None = None,
                    optimizer_state: dict | None = None, rng_states: list[Tensor] | None = None) -> Path:
    """Write ``RUN/checkpoint`` atomically from a model and optimizer, or from their (gathered)
    state dicts ``model_state``/``optimizer_state``; ``rng_states``: one CPU RNG state per rank."""
    if (model is None) == (model_state is None):
        raise ValueError("save_checkpoint needs exactly one of model= and model_state=")
    if model is not None:
        model_state = _unwrap(model).state_dict()
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "checkpoint"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        config_text = _json_text(config)
        save_file(_distinct(model_state), str(tmp / MODEL_FILE), metadata={CONFIG_HASH_KEY: _sha256_text(config_text)})
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if rng_states is not None:
            rng["ranks"] = rng_states
        if torch.cuda.is_initialized():  # not is_available(): that would start CUDA in a CPU run
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rng, tmp / "rng.pt")
        _write_json(tmp / "state.json", {"step": step, **(extra or {})})
        _write_text(tmp / "config.json", config_text)
        _write_json(tmp / MANIFEST_FILE, {"sha256": {f.name: _sha256_file(f) for f in sorted(tmp.iterdir())}})
        for file in tmp.iterdir():  # on disk before the rename makes them the checkpoint
            _fsync(file)
        previous = run_dir / "checkpoint.previous"
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
        tmp.rename(target)
        _fsync(run_dir)  # the renames too, before the fallback is deleted
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(err):
            raise CheckpointError(
                f"no space left (a full disk, a quota or a file-size limit: {_reason(err)}) while writing the "
                f"checkpoint in {run_dir}; "
                f"{_previous_checkpoint(target)}. Free some space, then resume (xmoe train --out RUN --resume)"
            ) from None
        raise
    return target


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through a Python file that keeps the OSError of a failed write: torch
    itself reports only "[enforce fail at inline_container.cc]", without the errno (ENOSPC)."""
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


class _RecordingWriter:
    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


# ENOSPC: disk full, EDQUOT: quota exceeded, EFBIG: file size limit; safetensors (Rust) reports
# them in its message only.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL
    return isinstance(err, (SafetensorError, RuntimeError)) and any(
        f"os error {code})" in str(err) for code in _DISK_FULL)


def _reason(err: BaseException) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def _previous_checkpoint(target: Path) -> str:
    try:
        return f"the previous checkpoint {target} (step {read_state(target)['step']}) is intact"
    except CheckpointError:
        return "there was no previous checkpoint"


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint (checked against the manifest), as a dict."""
    folder = checkpoint_dir(path)
    _verifier(folder, warn=False)("config.json")
    return _read_json(folder / "config.json")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = False, parallel=None) -> dict:
    """Load weights (and optimizer, RNG) into ``model``; returns state.json's contents.

    ``parallel`` (xmoe.distributed.Parallel): ``model`` holds expert shards; each takes its slice.
    """
    folder = checkpoint_dir(path)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    verify = _verifier(folder)
    verify(MODEL_FILE, "config.json")
    try:
        tensors = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {folder / MODEL_FILE} are corrupted or unreadable: {err}") from err
    _check_config_hash(folder)
    if parallel is not None:
        tensors = parallel.local_model_state(tensors)
    _load_weights(_unwrap(model), tensors, folder)
    if optimizer is not None:
        if not (folder / "optimizer.pt").is_file():
            raise CheckpointError(f"checkpoint {folder} has no optimizer.pt, so the run cannot be resumed")
        verify("optimizer.pt")
        state = _torch_load(folder / "optimizer.pt", "the optimizer state")
        try:
            if parallel is not None:
                state = parallel.local_optimizer_state(state, _unwrap(model), optimizer)
            optimizer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"optimizer state in {folder} does not fit this model: {err}") from err
    if restore_rng:
        if not (folder / "rng.pt").is_file():
            raise CheckpointError(f"checkpoint {folder} has no rng.pt, so the run cannot be resumed exactly")
        verify("rng.pt")
        _restore_rng(_torch_load(folder / "rng.pt", "the random number generator states"), folder, parallel)
    return read_state(folder)


def read_state(folder: Path) -> dict:
    """state.json of a checkpoint folder, checked against the manifest and for a step count."""
    _verifier(folder, warn=False)("state.json")
    state = _read_json(folder / "state.json")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint file {folder / 'state.json'} has no valid \"step\" (got {step!r}); "
                              f"it was edited or damaged: restore it, or start a new run")
    return state


def _restore_rng(rng, folder: Path, parallel) -> None:
    try:
        ranks = rng.get("ranks", [rng["cpu"]])
        rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
        # Each rank continues its own stream when the number of ranks is unchanged; otherwise
        # (a different layout) dropout masks cannot be replayed, and rank 0's state seeds all.
        torch.set_rng_state(ranks[rank] if len(ranks) == world else ranks[0])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (AttributeError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"checkpoint file {folder / 'rng.pt'} does not hold RNG states ({err}); "
                              f"it was edited or damaged: restore it, or start a new run") from None


def _torch_load(path: Path, what: str):
    """``torch.load`` of a file xmoe wrote (tensors and plain containers only), or a clear error."""
    try:
        # On the CPU first: load_state_dict moves each entry to its parameter's device.
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint file {path} holds objects other than tensors, so it was not written by xmoe: "
            f"refusing to load it (unpickling arbitrary objects can run code). Restore the file or start "
            f"a new run ({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {path} ({what}) is truncated or corrupted ({err}); "
                              f"restore it, or start a new run") from None


def _verifier(folder: Path, *, warn: bool = True):
    """A function that checks files of ``folder`` against its manifest (or, with ``warn``, warns
    that the checkpoint has none)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        if warn:
            warnings.warn(f"checkpoint {folder} has no {MANIFEST_FILE} (saved by an older xmoe): its files "
                          f"cannot be checked for corruption", stacklevel=3)
        return lambda *names: None
    recorded = _read_json(path).get("sha256")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"checkpoint file {path} has no \"sha256\" table; it was edited or damaged")

    def verify(*names: str) -> None:
        for name in names:
            if name not in recorded:
                raise CheckpointError(f"checkpoint file {folder / name} is not listed in {path}: the folder "
                                      f"was put together by hand; refusing to load it")
            if _sha256_file(folder / name) != recorded[name]:
                raise CheckpointError(
                    f"checkpoint file {folder / name} does not match the checksum recorded when it was saved: "
                    f"it was corrupted or replaced since. Restore it (or use an earlier checkpoint)"
                )

    return verify


def _check_config_hash(folder: Path) -> None:
    """The weights name the config they were saved with; refuse them beside another one."""
    with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
        recorded = (f.metadata() or {}).get(CONFIG_HASH_KEY)
    if recorded is not None and recorded != _sha256_text((folder / "config.json").read_text(encoding="utf-8")):
        raise CheckpointError(
            f"checkpoint weights {folder / MODEL_FILE} were saved with another config than "
            f"{folder / 'config.json'} (another run's weights?); put the matching config.json beside them"
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _distinct(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tied tensors (the same storage under two names) stored once; all contiguous."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().cpu().contiguous()
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, _json_text(data))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupted (not JSON: {err}); restore it, or start "
                              f"a new run") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} must hold a JSON object, not a {type(data).__name__}; "
                              f"it was edited or damaged: restore it, or start a new run")
    return data
