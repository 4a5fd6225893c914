"""Starting and resuming a run: the steps every task (xmoe.tasks: language modelling,
translation) takes around the shared loop, so that ``--resume`` continues a run exactly or
refuses with the reason. ``task`` is a task class; what each step asks of it is its method.

    train_task(Task, cfg, run_dir, resume=...)           # what train_lm and train_mt are
        with run_folder(run_dir, resume=...):             # 1. the lock; a failed start is undone
            saved_state = begin_run(run_dir, resume=...)  # 2. None for a new run
            check_resumable(saved_cfg, cfg, ...)          # 3. a resume changes nothing that shapes the run
            data = Task.prepare(...)                      # 4. tokenizer / vocabulary saved in the run folder
            check_same_data(saved_state, ...)             # 5. and the same text
            cfg = Task.fit_vocab(cfg, data)               # 6. the model's vocabulary is the data's
            model = Task.build_model(cfg.model)           # 7. after the memory check, from the seed
            train(model, Task(data, cfg), ...)            # 8. the shared loop

One process at a time owns a run folder: ``run_folder`` takes an exclusive ``fcntl.flock`` on
``RUN/.xmoe.lock`` (released by the kernel when the process ends, however it ends; POSIX only,
and only as reliable as the file system's locks: local disks yes, some network mounts no) and
writes who holds it there, so a second run on the folder stops with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmoe.distributed import Ranks
from xmoe.errors import UsageError

from .checkpoint import CheckpointError, checkpoint_dir, load_checkpoint, read_config, read_state
from .config import apply_overrides, flag_value, from_dict, to_dict
from .loop import TrainResult, lr_at, resolve_device, train
from .stopping import StopSignals

# Fields a resume may change: they do not alter which batches come next or how steps update.
RESUMABLE_TRAIN_FIELDS = ("max_steps", "schedule_steps", "log_every", "eval_every", "eval_batches", "save_every",
                          "device", "compile", "collective_timeout_s", "reshard_after_forward")


LOCK_FILE = ".xmoe.lock"
# Left behind only by a process killed while writing (kill -9, power loss); never part of a run:
# checkpoint folders, and the files of xmoe.data.files.temporary_name (tokenizer, vocabulary).
_STALE_TEMPORARIES = (".checkpoint-*", ".*.tmp", ".*.tmp.model", ".*.tmp.vocab")


class RunInUseError(RuntimeError):
    """Another process holds the run folder."""


@contextlib.contextmanager
def run_folder(run_dir: Path, *, resume: bool, owner: bool = True) -> Iterator[None]:
    """Hold ``run_dir`` for the duration of a run (``owner=False``: a rank that does not write).

    On entry, temporaries a killed process left (``.checkpoint-*``, ``.tokenizer.json.*.tmp``)
    are removed: the lock makes them nobody's. If a new run fails before it has written a checkpoint, everything this start
    created in the folder (tokenizer, vocabulary, metrics, the folder itself) is removed, so the
    next start does not silently reuse it; what was there before is never touched.
    """
    if not owner:
        yield
        return
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as err:
        raise UsageError(f"--out {run_dir}: a file stands where a folder must be ({err.strerror}); choose "
                         f"another --out") from None
    before = {p.name for p in run_dir.iterdir()}
    fd = None
    try:
        fd = _lock(run_dir)  # inside the guard: a lock file a failed start wrote is undone too
        _remove_stale_temporaries(run_dir)
        with StopSignals(raising=True):  # a SIGTERM while starting must reach the clean-up below
            yield
    except BaseException as err:
        mine = not isinstance(err, RunInUseError)  # another run's folder is left alone
        if mine and not resume and not (run_dir / "checkpoint").exists():
            _undo_start(run_dir, before, created)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(run_dir: Path) -> int:
    import fcntl

    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise RunInUseError(f"{run_dir} is in use by another run ({_describe_holder(holder)}); wait for it "
                                f"to finish or stop it, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed (a failed start) between our open and our lock: retry
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is starting"


def _remove_stale_temporaries(run_dir: Path) -> None:
    for pattern in _STALE_TEMPORARIES:
        for path in run_dir.glob(pattern):
            _remove(path)


def _undo_start(run_dir: Path, keep: set[str], created: bool) -> None:
    for path in [run_dir] if created else [p for p in run_dir.iterdir() if p.name not in keep]:
        _remove(path)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def run_config(task, preset: str | None, overrides: dict[str, str], *,
               resume_from: str | os.PathLike | None = None) -> Any:
    """The config a run of ``task`` starts from: ``preset`` (None: the task's default) with ``overrides``; to
    resume, the config saved in run folder ``resume_from`` with them (train_task then refuses
    those that would break exactness), where ``preset``, if given, must be the run's."""
    if "model.vocab_size" in overrides:
        raise UsageError(f"--model.vocab_size: a run's vocabulary is its tokenizer's, trained on the data; set "
                         f"--data.vocab_size={overrides['model.vocab_size']} instead (the model follows it)")
    if resume_from is None:
        return task.config(preset or task.default_preset, overrides=_absolute_paths(task, overrides))
    saved = saved_config(resume_from, task)
    if preset is not None and preset != saved.preset:
        raise UsageError(f"--resume: {resume_from} was trained with --preset {saved.preset}, not {preset}")
    return apply_overrides(saved, _absolute_paths(task, overrides, saved))


def _absolute_paths(task, overrides: dict[str, str], saved=None) -> dict[str, str]:
    """``overrides`` with the task's file paths made absolute: a relative one would resolve
    against whichever folder a later command (eval, --resume) runs in. On a resume, a path that
    names the file the run saved (as given then, relative or not) changes nothing and is left out."""
    saved_flat = {} if saved is None else _flatten(to_dict(saved))
    out = {}
    for key, value in overrides.items():
        path = flag_value(value) if key in task.path_fields else "null"  # as the parser reads it: unquoted, none
        if path != "null":
            value = os.path.abspath(os.path.expanduser(path))  # no shell expands ~ after --data.path=
            if saved_flat.get(key) is not None and os.path.abspath(os.path.expanduser(saved_flat[key])) == value:
                continue
        out[key] = value
    return out


def train_task(task, cfg, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
               ranks: Ranks | None = None) -> TrainResult:
    """Prepare the data (its vocabulary saved in ``run_dir``), build the model and run the shared
    loop; ``resume`` continues the run in ``run_dir`` exactly, or refuses.

    ``ranks`` (xmoe.distributed.Parallel): this process is one rank of a distributed run; rank
    0 owns the run folder and prepares the data first."""
    run_dir = Path(run_dir)
    world_size = ranks.world_size if ranks is not None else 1
    with run_folder(run_dir, resume=resume, owner=ranks is None or ranks.is_main):
        saved_state = begin_run(run_dir, resume=resume)
        if resume:
            check_resumable(saved_config(run_dir, task), cfg, run_dir, saved_state=saved_state,
                            world_size=world_size, also_resumable=task.also_resumable)
        data = task.prepare(cfg, run_dir, resume, ranks)
        check_same_data(saved_state, data.fingerprint, run_dir, task.describe_data(cfg))
        cfg = task.fit_vocab(cfg, data)
        check_fits_in_memory(task.num_params(cfg.model), f"preset {cfg.preset}")
        torch.manual_seed(cfg.train.seed)
        model = task.build_model(cfg.model)  # every rank builds the same full model, then keeps its expert shard
        return train(model, task(data, cfg), cfg.train, run_dir, config=to_dict(cfg), resume=resume,
                     progress=progress, extra_state={"data_fingerprint": data.fingerprint, "world_size": world_size},
                     ranks=ranks, run_files=task.vocab_files)


@dataclass(frozen=True)
class LoadedRun:
    """A trained model, its resolved config, its run folder and its vocabulary (a language
    model's BPE tokenizer, a translation run's subword vocabulary)."""

    model: nn.Module
    cfg: Any
    run_dir: Path
    vocab: Any


def load_run(task, path: str | os.PathLike, *, device: str = "auto") -> LoadedRun:
    """The run of ``task`` in ``path`` (a run or checkpoint folder), its model in eval mode."""
    cfg = saved_config(path, task)
    check_fits_in_memory(task.num_params(cfg.model), f"the model in {checkpoint_dir(path) / 'config.json'}")
    model = task.build_model(cfg.model)
    load_checkpoint(path, model)
    model.to(resolve_device(device)).eval()
    run_dir = checkpoint_dir(path).parent
    return LoadedRun(model, cfg, run_dir, task.load_vocab(run_dir))


# What each task's run is, for a command given a run of the other task.
_RUNS = {"lm": "a language-model run (xmoe train): use xmoe eval, generate or sweep-threshold, and xmoe train to "
               "--resume it",
         "mt": "a translation run (xmoe train-mt): use xmoe translate or eval-mt, and xmoe train-mt to --resume it"}


def task_of(config: dict) -> str:
    """The task ("lm" or "mt") of a saved run config (config.json as a dict): its ``task`` field;
    folders saved before that field existed are told apart by their decoding settings, which only
    translation has."""
    return config.get("task") or ("mt" if "decode" in config else "lm")


def saved_config(path: str | os.PathLike, task) -> Any:
    """The run config saved with a checkpoint, as ``task``'s config class; a run of another task
    is refused by name."""
    folder = checkpoint_dir(path)
    data = read_config(folder)
    found = task_of(data)
    if found != task.name:
        raise CheckpointError(f"{folder.parent if folder.name == 'checkpoint' else folder} is "
                              f"{_RUNS.get(found, f'a run of task {found!r}')}")
    try:
        return from_dict(task.config_class, {**data, "task": found})
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint file {folder / 'config.json'} is not a valid run config ({err}); "
                              f"it was edited or damaged: restore it, or start a new run") from None


def check_fits_in_memory(params: int, what: str) -> None:
    """Refuse, before allocating, a model whose fp32 weights alone exceed this machine's memory
    (a mistyped size in a config would otherwise try to allocate terabytes)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    if 4 * params > memory:
        raise UsageError(f"{what} would have {params:,} parameters ({4 * params / 2**30:,.0f} GiB in fp32), more "
                         f"than this machine's {memory / 2**30:,.0f} GiB of memory; check its model sizes "
                         f"(model.vocab_size, model.d_model, ...)")


def begin_run(run_dir: Path, *, resume: bool) -> dict | None:
    """state.json of the checkpoint a resume continues; a new run must not overwrite one."""
    if resume:
        return read_state(checkpoint_dir(run_dir))
    if (run_dir / "checkpoint").exists() or (run_dir / "checkpoint.previous").exists():
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, or choose another --out"
        )
    if (run_dir / "config.json").is_file():  # export-hf, convert or save_pretrained wrote it
        raise FileExistsError(
            f"{run_dir} holds a Hugging Face model (config.json): a new run would put its files among the model's "
            f"and train with the model's tokenizer; choose another --out"
        )
    return None


def check_resumable(saved_cfg, cfg, run_dir: Path, *, saved_state: dict, world_size: int = 1,
                    also_resumable: tuple[str, ...] = ()) -> None:
    """A resume must replay the same micro-batches per step: the same config (bar the fields in
    RESUMABLE_TRAIN_FIELDS, ``model.vocab_size``, which the data sets, and ``also_resumable``:
    dotted names, or prefixes ending in "."), and the same ``grad_accum x ranks``; a run may move
    between numbers of processes if it keeps that product."""
    saved_world = saved_state.get("world_size", 1)
    saved_micro, micro = saved_cfg.train.grad_accum * saved_world, cfg.train.grad_accum * world_size
    if saved_micro != micro:
        hint = (f"; with {world_size} rank(s) use --train.grad_accum={saved_micro // world_size}"
                if saved_micro % world_size == 0 else "")
        raise UsageError(
            f"--resume: {run_dir} took {saved_micro} micro-batches per step (train.grad_accum="
            f"{saved_cfg.train.grad_accum} x {saved_world} rank(s)); this run would take {micro} "
            f"(train.grad_accum={cfg.train.grad_accum} x {world_size} rank(s)), so the batches would differ{hint}"
        )
    allowed = {f"train.{name}" for name in RESUMABLE_TRAIN_FIELDS} | set(also_resumable)
    free = allowed | {"train.grad_accum", "model.vocab_size"}  # checked above; set by the data
    old, new = _flatten(to_dict(saved_cfg)), _flatten(to_dict(cfg))
    changed = sorted(key for key in old.keys() | new.keys()
                     if old.get(key) != new.get(key) and not _matches(key, free))
    if changed:
        raise UsageError(
            f"--resume continues {run_dir} exactly, so these may not change: {', '.join(changed)}; "
            f"a resume may change only {', '.join(n + '*' if n.endswith('.') else n for n in sorted(allowed))}"
        )
    _warn_if_schedule_moves(saved_cfg.train, cfg.train, saved_state["step"], run_dir)  # only for a resume that runs


def _warn_if_schedule_moves(saved, new, step: int, run_dir: Path) -> None:
    """Extending a run (a larger max_steps) re-stretches a schedule that spans max_steps: say so,
    with the learning rates before and after, and how to keep the old one."""
    before = [lr_at(s, saved) for s in range(step, min(step + 10, saved.max_steps) + 1)]
    after = [lr_at(s, new) for s in range(step, min(step + 10, saved.max_steps) + 1)]
    if all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(before, after)):
        return
    old_span, new_span = saved.schedule_steps or saved.max_steps, new.schedule_steps or new.max_steps
    warnings.warn(
        f"--resume of {run_dir} at step {step}: the {new.schedule} schedule now spans {new_span} steps instead of "
        f"{old_span}, so the learning rate at step {step + 1} is {lr_at(step, new):.3g} instead of "
        f"{lr_at(step, saved):.3g} (the run continues, but not as it would have). To keep the old schedule "
        f"(its last value from step {old_span} on), add --train.schedule_steps={old_span}",
        stacklevel=3,
    )


def check_same_data(saved_state: dict | None, fingerprint: str, run_dir: Path, what: str) -> None:
    """Refuse a resume whose training text changed (it would train on other batches)."""
    if saved_state is not None and saved_state.get("data_fingerprint") not in (None, fingerprint):
        raise UsageError(
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
