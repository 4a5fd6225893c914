"""Checkpoints: safetensors weights + optimizer + RNG + step + the resolved config, atomically.

Layout of ``RUN/checkpoint/``:

    model.safetensors   weights (tied tensors stored once)
    optimizer.pt        optimizer state (torch.save, read back with weights_only=True)
      or, from a distributed run (a sharded checkpoint):
    dcp/                weights and optimizer state keyed by parameter name, written by every
                        rank at once (torch.distributed.checkpoint: each rank its own shards,
                        a replicated tensor once), each rank's file with the run stamp
    rng.pt              torch CPU (and CUDA) RNG states, for an exact resume (those of every
                        rank in a distributed run)
    state.json          {"step": ..., "run_id": ...}: the next step to run; batches are a function of it
    config.json         the resolved run config: `xmoe eval --checkpoint RUN` needs no flags
    manifest.json       the run stamp, and the sha256 of each file above (written last)

Verification (xmoe.training.manifest): safetensors and torch.save carry no checksum, so a
flipped bit would load silently. ``load_checkpoint`` checks each file it reads against
manifest.json, and the run stamp inside each file (run id, step, the sha256 of config.json and
of the run's tokenizer) against the manifest's, before using it, and refuses with the file
named: files copied in from another run or step (even with the same shapes, even with the
manifest recomputed) are refused too. Cost: one sha256 pass (``hashlib``) over each file read
or written, small beside the write or read itself (measured in benchmarks/README.md,
"Checkpoint checksums"). Checkpoints written before manifests existed load with a warning.
Nothing is unpickled but tensors and plain values: optimizer.pt and rng.pt with
``weights_only=True``, a sharded checkpoint through xmoe.training.shards.ShardReader.

A checkpoint is written to a temporary folder beside the target and then renamed into place,
so a crash mid-write never destroys the previous one; ``load`` falls back to the previous one
if a crash fell between the two renames.

Either kind loads into a run of any number of ranks, or into one process (``xmoe eval``,
``export-hf``): a sharded checkpoint describes every tensor of the whole run (expert shards as
slices of the experts, FSDP's shards as slices of the parameters), and torch.distributed.checkpoint
reads each rank's part, whatever the layout that wrote it. ``consolidate_checkpoint`` turns a
sharded checkpoint into a single-file one in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from xmoe.distributed import SingleProcess
from xmoe.errors import CheckpointError, is_disk_full

from xmoe.distributed.parallel import rng_state

from .manifest import RUN_KEY, Manifest, Stamp, new_stamp, read_json, write_manifest
from .shards import ShardReader

MODEL_FILE = "model.safetensors"
SHARDS_DIR = "dcp"  # a sharded checkpoint's tensors (torch.distributed.checkpoint's files)
REQUIRED = (MODEL_FILE, "state.json", "config.json")


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
                    optimizer_state: dict | None = None, rng: dict | None = None,
                    run_files: dict[str, str] | None = None) -> Path:
    """Write ``RUN/checkpoint`` atomically from a model and optimizer, or from their (whole)
    state dicts ``model_state``/``optimizer_state``; ``rng``: rng.pt's contents (default: this
    process's RNG states). ``extra["run_id"]``: the run it continues (default: a new run);
    ``run_files``: sha256 of the run-folder files it needs (manifest.hash_run_files)."""
    if (model is None) == (model_state is None):
        raise ValueError("save_checkpoint needs exactly one of model= and model_state=")
    if model is not None:
        model_state = _unwrap(model).state_dict()
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
    run_dir = Path(run_dir)
    tmp = _temp_folder(run_dir)
    with _cleaned_up_on_error(tmp, run_dir):
        config_text = json.dumps(config, indent=2)
        stamp = new_stamp(step=step, config_text=config_text, run_id=(extra or {}).get("run_id"),
                          run_files=run_files or {})
        save_file(_distinct(model_state), str(tmp / MODEL_FILE), metadata={RUN_KEY: stamp.text()})
        if optimizer_state is not None:
            _torch_save({**optimizer_state, RUN_KEY: stamp.text()}, tmp / "optimizer.pt")
        _write_common(tmp, stamp=stamp, config_text=config_text, extra=extra, rng=rng or _rng_file([rng_state()]))
        _commit(tmp, run_dir)
    return run_dir / "checkpoint"


def save_sharded_checkpoint(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            *, ranks, step: int, config: dict, extra: dict | None = None,
                            run_files: dict[str, str] | None = None) -> Path:
    """Write ``RUN/checkpoint`` from every rank of a distributed run at once (collective).

    Each rank writes its own shards (torch.distributed.checkpoint, into ``dcp/``; an expert or
    a dense parameter replicated on several ranks is written once); rank 0 then writes the small
    files, the manifest, and renames the folder into place, as ``save_checkpoint`` does."""
    run_dir = Path(run_dir)
    tmp = Path(ranks.broadcast(str(_temp_folder(run_dir)) if ranks.is_main else None))
    config_text = json.dumps(config, indent=2)
    stamp = ranks.broadcast(new_stamp(step=step, config_text=config_text, run_id=(extra or {}).get("run_id"),
                                         run_files=run_files or {}) if ranks.is_main else None)
    state = _state_template(model, optimizer, ranks).saved
    state[f"{RUN_KEY}.rank{ranks.rank}"] = stamp.tensor(ranks.rank)  # read back by _check_shard_stamps
    rng = _rng_file(ranks.rng_states())  # collective
    try:
        dcp.save(state, checkpoint_id=str(tmp / SHARDS_DIR))  # collective; raises on every rank if one fails
    except BaseException as err:
        if ranks.is_main:
            with _cleaned_up_on_error(tmp, run_dir):
                raise _unwrap_checkpoint_exception(err) from None
        raise
    if ranks.is_main:
        with _cleaned_up_on_error(tmp, run_dir):
            _write_common(tmp, stamp=stamp, config_text=config_text, extra=extra, rng=rng)
            _commit(tmp, run_dir)
    ranks.barrier()
    return run_dir / "checkpoint"


def consolidate_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Turn a sharded checkpoint (written by a distributed run) into a single-file one, in one
    process and without the model's code: ``model.safetensors`` and ``optimizer.pt`` as a single
    process writes them, the same step, config, RNG states and extra state. Written atomically
    to ``out/checkpoint`` (default: in place of the sharded one), bound to the same run files
    (copy the run's tokenizer into ``out`` too, to load it from there). Returns the new folder."""
    folder = checkpoint_dir(path)
    if not (folder / SHARDS_DIR).is_dir():
        raise CheckpointError(f"checkpoint {folder} is not sharded (no {SHARDS_DIR}/): it is a single-file one already")
    manifest = _checked_manifest(folder)
    _verify_sharded(folder, manifest, None)
    full = _read_shards(folder, {}, manifest, planner=_EmptyStateDictLoadPlanner())
    optimizer_state = _indexed_optimizer_state(full["optim"]) if "optim" in full else None
    state = read_state(folder, manifest)
    return save_checkpoint(Path(out) if out is not None else folder.parent, model_state=full["model"],
                           optimizer_state=optimizer_state, step=state.pop("step"), extra=state,
                           config=read_config(folder), rng=_read_rng(folder, manifest),
                           run_files=manifest.stamp.files if manifest.stamp else None)


def _temp_folder(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))


def _rng_file(states: list[dict[str, Tensor]]) -> dict:
    """rng.pt: every rank's states (CPU, and CUDA where used); "cpu" is rank 0's, as before."""
    return {"cpu": states[0]["cpu"], "ranks": states}


def _write_common(tmp: Path, *, stamp: Stamp, config_text: str, extra: dict | None, rng: dict) -> None:
    """The files every checkpoint has, each with ``stamp``, then the manifest of everything in ``tmp``."""
    _torch_save({**rng, RUN_KEY: stamp.text()}, tmp / "rng.pt")
    state = {"step": stamp.step, **(extra or {}), "run_id": stamp.run_id}
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    (tmp / "config.json").write_text(config_text, encoding="utf-8")
    write_manifest(tmp, stamp)


def _commit(tmp: Path, run_dir: Path) -> None:
    """Make ``tmp`` the run's checkpoint: on disk first, then renamed into place, keeping the
    previous checkpoint as a fallback until the renames are on disk too."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    target, previous = run_dir / "checkpoint", run_dir / "checkpoint.previous"
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
    tmp.rename(target)
    _fsync(run_dir)  # the renames too, before the fallback is deleted
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def _cleaned_up_on_error(tmp: Path, run_dir: Path):
    """Remove the half-written ``tmp`` on any error; a full disk becomes a CheckpointError."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise CheckpointError(
                f"no space left (a full disk, a quota or a file-size limit: {reason}) while writing the "
                f"checkpoint in {run_dir}; "
                f"{_what_to_do_now(run_dir / 'checkpoint')}"
            ) from None
        raise


def _unwrap_checkpoint_exception(err: BaseException) -> BaseException:
    """The first rank's own error inside torch.distributed.checkpoint's CheckpointException."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))  # (exception, traceback summary)
        inner = first[0] if isinstance(first, tuple) else getattr(first, "exc", first)
        if isinstance(inner, BaseException):
            return inner
    return err


@dataclass(frozen=True)
class _State:
    """Model (and optimizer) state keyed by parameter name, two ways: ``live`` as
    torch.distributed.checkpoint.state_dict gives it (what ``set_*_state_dict`` takes back), and
    ``saved``, the same tensors (views, nothing copied) as tensors of the whole run
    (``ranks.global_view``): what torch.distributed.checkpoint writes, and fills in place."""

    live: dict
    saved: dict


def _state_template(model: nn.Module, optimizer: torch.optim.Optimizer | None, ranks) -> _State:
    model = _unwrap(model)
    live = {"model": get_model_state_dict(model)}
    saved = {"model": {k: ranks.global_view(k, v) for k, v in live["model"].items()}}
    if optimizer is not None:
        live["optim"] = get_optimizer_state_dict(model, optimizer)  # creates Adam's moments if no step ran yet
        saved["optim"] = {
            "state": {name: {k: ranks.global_view(name, v) if isinstance(v, Tensor) else v for k, v in entry.items()}
                      for name, entry in live["optim"]["state"].items()},
            "param_groups": live["optim"]["param_groups"],
        }
    return _State(live, saved)


def _indexed_optimizer_state(named: dict) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) keyed by
    position instead (``Optimizer.state_dict``'s): the position is the name's place in the
    param groups, in order."""
    names = [name for group in named["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in named["param_groups"]]
    return {"state": {index[name]: entry for name, entry in named["state"].items()}, "param_groups": groups}


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


def _what_to_do_now(target: Path) -> str:
    """After a failed save: what is on disk, and how to go on from it."""
    try:
        step = read_state(target)["step"]
    except CheckpointError:  # a new run's first save: its failed start removes the folder
        return "there was no earlier checkpoint, so there is nothing to resume: free some space, then start the run again"
    return f"the previous checkpoint {target} (step {step}) is intact. Free some space, then resume (--resume)"


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint (checked against the manifest and its stamp), as a dict."""
    folder = checkpoint_dir(path)
    manifest = Manifest(folder, warn=False)
    manifest.verify("config.json")
    text = (folder / "config.json").read_text(encoding="utf-8")
    manifest.check_config(text)
    return read_json(folder / "config.json")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = False, ranks=None) -> dict:
    """Load weights (and optimizer, RNG) into ``model``; returns state.json's contents.

    Every file is checked before it is used (xmoe.training.manifest): listed in the manifest
    with its checksum, stamped with the checkpoint's run and step, beside the config and the
    run's tokenizer it was saved with. Either kind of checkpoint (single-file, or sharded by a
    distributed run) loads into either kind of run. ``ranks`` (xmoe.distributed.Parallel,
    collective): ``model`` is sharded (FSDP, expert parallelism); each rank reads its part,
    whatever the number of ranks that saved it.
    """
    ranks = ranks or SingleProcess()
    folder = checkpoint_dir(path)
    manifest = _checked_manifest(folder)
    state = _state_template(model, optimizer, ranks)  # what this run holds; each rank fills its part
    if (folder / SHARDS_DIR).is_dir():
        _read_sharded(folder, manifest, state.saved, ranks)
    else:
        _read_single_file(folder, manifest, state)
    _apply(state, model, optimizer)
    if restore_rng:
        if not (folder / "rng.pt").is_file():
            raise CheckpointError(f"checkpoint {folder} has no rng.pt, so the run cannot be resumed exactly")
        _restore_rng(_read_rng(folder, manifest), folder, ranks)
    return read_state(folder, manifest)


def _checked_manifest(folder: Path) -> Manifest:
    """The manifest of ``folder``, after checking that every file it lists is there and nothing
    else is, and that config.json and the run's files (tokenizer) are those of its stamp."""
    manifest = Manifest(folder)
    manifest.check_complete()
    manifest.verify("config.json")
    manifest.check_config((folder / "config.json").read_text(encoding="utf-8"))
    manifest.check_run_files()
    return manifest


def _read_single_file(folder: Path, manifest: Manifest, state: _State) -> None:
    """Fill ``state`` from model.safetensors and optimizer.pt, each checked first; every rank
    reads the whole files and keeps its part. A parameter without optimizer state in the file
    (saved before its first step) is left without."""
    template = state.saved
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    manifest.verify(MODEL_FILE)
    try:
        tensors = load_file(str(folder / MODEL_FILE))
        with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {folder / MODEL_FILE} are corrupted or unreadable: {err}") from err
    _check_file_stamp(manifest, MODEL_FILE, header.get(RUN_KEY))
    _check_weights_match(template["model"], tensors, folder)
    _fill(template["model"], tensors)
    if "optim" in template:
        if not (folder / "optimizer.pt").is_file():
            raise CheckpointError(f"checkpoint {folder} has no optimizer.pt, so the run cannot be resumed")
        optimizer_state = _read_stamped(folder, manifest, "optimizer.pt", "the optimizer state")
        names = [name for group in template["optim"]["param_groups"] for name in group["params"]]
        try:  # optimizer.pt is keyed by position in the param groups, the template by name
            named = {names[int(i)]: entry for i, entry in optimizer_state["state"].items()}
            for name in list(template["optim"]["state"]):
                if name in named:
                    _fill(template["optim"]["state"][name], named[name])
                else:
                    del template["optim"]["state"][name], state.live["optim"]["state"][name]
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"optimizer state in {folder} does not fit this model: {err!r}") from err


def _read_rng(folder: Path, manifest: Manifest) -> dict:
    """rng.pt, checked, without its stamp."""
    return _read_stamped(folder, manifest, "rng.pt", "the random number generator states")


def _read_stamped(folder: Path, manifest: Manifest, name: str, what: str) -> dict:
    """A torch.save'd dict of the checkpoint: checksum, contents (weights only), then stamp."""
    manifest.verify(name)
    data = _torch_load(folder / name, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {folder / name} does not hold {what}; it was edited or damaged: "
                              f"restore it, or start a new run")
    _check_file_stamp(manifest, name, data.pop(RUN_KEY, None))
    return data


def _check_file_stamp(manifest: Manifest, name: str, text: str | None) -> None:
    manifest.check_stamp(name, None if text is None else Stamp.parse(text, manifest.folder / name))


def _read_sharded(folder: Path, manifest: Manifest, template: dict, ranks) -> None:
    """Fill ``template`` (``_State.saved``) from the shards in ``dcp/``, each rank reading its part."""
    missing = [name for name in ("state.json", "config.json", f"{SHARDS_DIR}/.metadata") if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    _verify_sharded(folder, manifest, ranks)
    _read_shards(folder, template, manifest, no_dist=ranks.world_size == 1)


def _read_shards(folder: Path, state: dict, manifest: Manifest, *, planner=None, no_dist: bool = True) -> dict:
    """Fill ``state`` (in place, and returned) from the shards in ``folder/dcp`` through
    ``ShardReader``, which unpickles nothing but DCP's metadata and plain values
    (xmoe.training.shards), after checking every shard file's stamp; ``planner``:
    _EmptyStateDictLoadPlanner reads every entry there is (the stamps left out)."""
    reader = ShardReader(folder / SHARDS_DIR)
    _check_shard_stamps(reader, manifest, no_dist=no_dist)
    _load_shards(folder, state, reader, planner=planner, no_dist=no_dist)
    for key in [key for key in state if key.startswith(RUN_KEY)]:
        del state[key]
    return state


def _load_shards(folder: Path, state: dict, reader: ShardReader, *, planner=None, no_dist: bool = True) -> None:
    """DCP's load of ``state`` through ``reader``, its errors as CheckpointErrors."""
    try:
        # torch's private loader: dcp.load cannot fill an empty state dict, and dcp_to_torch_save
        # takes no storage reader.
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except BaseException as err:  # DCP wraps each rank's error in a CheckpointException (a BaseException)
        inner = _unwrap_checkpoint_exception(err)
        if isinstance(inner, CheckpointError):
            raise inner from None
        if not isinstance(inner, (RuntimeError, ValueError, KeyError)):
            raise
        raise CheckpointError(
            f"checkpoint {folder} does not match this model ({inner!r:.300}); it was made "
            f"with another config: load it with the config.json saved beside it"
        ) from None


def _check_shard_stamps(reader: ShardReader, manifest: Manifest, *, no_dist: bool) -> None:
    """Each shard file carries the stamp of the rank that wrote it, and the checkpoint's: read
    first, on their own (a few bytes per rank), before any tensor is used."""
    metadata = reader.metadata
    where = {index.fqn: info.relative_path for index, info in metadata.storage_data.items()
             if index.fqn.startswith(RUN_KEY)}
    stamps = {key: torch.zeros(meta.size, dtype=torch.uint8) for key, meta in metadata.state_dict_metadata.items()
              if key in where and isinstance(meta, TensorStorageMetadata)}
    if stamps:
        _load_shards(reader.folder.parent, stamps, reader, no_dist=no_dist)
    for key, tensor in sorted(stamps.items()):
        name = f"{SHARDS_DIR}/{where[key]}"
        rank = int(key.rpartition("rank")[2])
        manifest.check_stamp(name, Stamp.from_tensor(tensor, rank, manifest.folder / name))
    for file in sorted({info.relative_path for info in metadata.storage_data.values()} - set(where.values())):
        manifest.check_stamp(f"{SHARDS_DIR}/{file}", None)


def _verify_sharded(folder: Path, manifest: Manifest, ranks) -> None:
    """Every file of a sharded checkpoint against its manifest, the files shared out over the
    ranks (each reads 1 / W of them); any rank's failure fails every rank."""
    ranks = ranks or SingleProcess()
    manifest.verify("state.json")
    shards = sorted(f.relative_to(folder).as_posix() for f in (folder / SHARDS_DIR).rglob("*") if f.is_file())
    error = None
    try:
        manifest.verify(*shards[ranks.rank :: ranks.world_size])
    except CheckpointError as err:
        error = err
    failed = ranks.sum(int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"checkpoint {folder}: {failed} rank(s) found files that do not match the manifest "
                              f"(their errors name them); restore them, or use an earlier checkpoint")


def _fill(template: dict, full: dict) -> None:
    """Copy ``full``'s whole tensors into ``template``'s (in place), each rank taking its part of
    a DTensor (computed locally: every rank holds the whole tensor, nothing is sent)."""
    for key, target in template.items():
        if not isinstance(target, Tensor) or key not in full:
            continue
        source = full[key].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            source = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target = target.to_local()
        target.copy_(source)


def _apply(state: _State, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Hand the filled state back to the model and optimizer."""
    model = _unwrap(model)
    set_model_state_dict(model, state.live["model"], options=StateDictOptions(strict=False))  # tied: listed once
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state.live["optim"])


def read_state(folder: Path, manifest: Manifest | None = None) -> dict:
    """state.json of a checkpoint folder, checked against the manifest, its stamp (``manifest``:
    the one a load is checking against) and for a step count."""
    manifest = manifest or Manifest(folder, warn=False)
    manifest.verify("state.json")
    state = read_json(folder / "state.json")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint file {folder / 'state.json'} has no valid \"step\" (got {step!r}); "
                              f"it was edited or damaged: restore it, or start a new run")
    manifest.check_state(state)
    return state


def _restore_rng(rng, folder: Path, ranks) -> None:
    try:
        states = rng.get("ranks", [rng["cpu"]])
        states = [s if isinstance(s, dict) else {"cpu": s} for s in states]  # older files: CPU states only
        # Each rank continues its own streams when the number of ranks is unchanged; otherwise
        # (another layout) dropout masks cannot be replayed, and rank 0's states seed all.
        mine = states[ranks.rank] if len(states) == ranks.world_size else states[0]
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])  # this rank's device
        elif "cuda" in rng and torch.cuda.is_available():  # older files: rank 0's devices
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


def _check_weights_match(expected: dict[str, Tensor], tensors: dict[str, Tensor], folder: Path) -> None:
    """The checkpoint's tensors are the model's: same names and shapes (tied ones stored once)."""
    key = lambda t: (t.to_local() if isinstance(t, DTensor) else t).data_ptr()
    stored = {key(t) for name, t in expected.items() if name in tensors}
    aliases = {name for name, t in expected.items() if name not in tensors and key(t) in stored}
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
