"""What binds the files of a checkpoint to one run and one step, and the checks made before any
of them is used.

``manifest.json``, written last into ``RUN/checkpoint``:

    {"run": {"run_id": "...", "step": 6, "config_sha256": "...", "files": {"tokenizer.json": "..."}},
     "sha256": {"model.safetensors": "...", "optimizer.pt": "...", "dcp/__0_0.distcp": "...", ...}}

``sha256`` catches a flipped bit or a replaced file, but anyone can recompute it. So the ``run``
stamp is also written inside every file: the safetensors header of the weights, a key of
optimizer.pt and of rng.pt, state.json's ``run_id`` and ``step``, and in a sharded checkpoint a
small tensor in each rank's shard file (with the rank). config.json and the files of the run
folder the checkpoint needs (its tokenizer or subword model) are bound by their sha256 in the
stamp. A file of another run or another step, a state.json whose step was edited, another run's
tokenizer: each disagrees with the stamp and is refused, naming the file, even when the manifest
was recomputed to fit. The stamp is for mix-ups, not forgery: whoever rewrites every file can
forge it (that no checkpoint can run code is xmoe.training.shards' job).

A checkpoint without a manifest (saved before manifests existed) loads with a warning; one
whose files carry stamps but whose manifest is gone is refused.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from xmoe.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
RUN_KEY = "xmoe_run"  # the stamp's key in the weights' header, optimizer.pt, rng.pt; a prefix in shards


@dataclass(frozen=True)
class Stamp:
    """The run and step every file of one checkpoint belongs to, and the sha256 of the config
    and run-folder files (``files``: name -> sha256) it was saved with."""

    run_id: str
    step: int
    config_sha256: str
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data, where: Path) -> Stamp:
        """A stamp from its JSON text or dict; a CheckpointError naming ``where`` if malformed."""
        try:
            data = json.loads(data) if isinstance(data, (str, bytes)) else data
            stamp = cls(**data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint file {where} holds a damaged run stamp ({err}); restore it, or use "
                                  f"an earlier checkpoint") from None
        if not (isinstance(stamp.run_id, str) and isinstance(stamp.step, int) and isinstance(stamp.files, dict)):
            raise CheckpointError(f"checkpoint file {where} holds a damaged run stamp; restore it, or use an "
                                  f"earlier checkpoint")
        return stamp

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def tensor(self, rank: int) -> Tensor:
        """The stamp of rank ``rank``'s shard file, as a tensor (torch.distributed.checkpoint
        writes each rank's tensors into that rank's file; plain values only into rank 0's)."""
        text = json.dumps({"rank": rank, "stamp": asdict(self)}, sort_keys=True)
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, t: Tensor, rank: int, where: Path) -> Stamp:
        """The stamp ``tensor`` wrote for ``rank``; refused if it names another rank."""
        try:
            data = json.loads(bytes(t.tolist()).decode("utf-8"))
            found_rank, stamp = data["rank"], data["stamp"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint shard {where} holds a damaged run stamp ({err}); it was damaged or "
                                  f"swapped: restore the checkpoint's files together") from None
        if found_rank != rank:
            raise CheckpointError(f"checkpoint shard {where} holds rank {found_rank}'s files where rank {rank}'s "
                                  f"belong: shard files were swapped. Restore the checkpoint's files together")
        return cls.parse(stamp, where)

    def describe(self) -> str:
        return f"run {self.run_id[:12]} at step {self.step}"


def new_stamp(*, step: int, config_text: str, run_id: str | None, run_files: dict[str, str]) -> Stamp:
    """The stamp of a checkpoint about to be written (``run_id`` None: a new run)."""
    return Stamp(run_id=run_id or uuid.uuid4().hex, step=step, config_sha256=sha256_text(config_text),
                 files=dict(run_files))


def hash_run_files(run_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of the files ``names`` of ``run_dir`` that a checkpoint needs (those present)."""
    return {name: sha256_file(run_dir / name) for name in names if (run_dir / name).is_file()}


def write_manifest(folder: Path, stamp: Stamp) -> None:
    """manifest.json of every file now in ``folder``, with the stamp."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    table = {f.relative_to(folder).as_posix(): sha256_file(f) for f in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"run": asdict(stamp), "sha256": table}, indent=2),
                                        encoding="utf-8")


class Manifest:
    """The manifest of checkpoint ``folder`` and the checks of its files against it."""

    def __init__(self, folder: Path, *, warn: bool = True) -> None:
        self.folder = folder
        self.path = folder / MANIFEST_FILE
        self.sha256: dict[str, str] | None = None
        self.stamp: Stamp | None = None
        if not self.path.is_file():
            if warn:
                warnings.warn(f"checkpoint {folder} has no {MANIFEST_FILE} (saved by an older xmoe): its files "
                              f"cannot be checked for corruption", stacklevel=3)
            return
        data = read_json(self.path)
        self.sha256 = data.get("sha256")
        if not isinstance(self.sha256, dict):
            raise CheckpointError(f"checkpoint file {self.path} has no \"sha256\" table; it was edited or damaged")
        if "run" in data:
            self.stamp = Stamp.parse(data["run"], self.path)

    def check_complete(self) -> None:
        """Every file of the folder is listed in the manifest, and every listed file is there."""
        if self.sha256 is None:
            return
        present = {f.relative_to(self.folder).as_posix() for f in self.folder.rglob("*") if f.is_file()}
        missing, unlisted = sorted(set(self.sha256) - present), sorted(present - set(self.sha256) - {MANIFEST_FILE})
        if missing:
            raise CheckpointError(f"checkpoint file {self.folder / missing[0]} is missing (listed in {self.path}); "
                                  f"restore it from where the checkpoint came from, or use an earlier checkpoint")
        if unlisted:
            raise CheckpointError(f"checkpoint file {self.folder / unlisted[0]} is not listed in {self.path}: the "
                                  f"folder was put together by hand; refusing to load it")

    def verify(self, *names: str) -> None:
        """Each file ``names`` is listed and has the sha256 recorded when it was saved."""
        if self.sha256 is None:
            return
        for name in names:
            if name not in self.sha256:
                raise CheckpointError(f"checkpoint file {self.folder / name} is not listed in {self.path}: the "
                                      f"folder was put together by hand; refusing to load it")
            if not (self.folder / name).is_file():
                raise CheckpointError(f"checkpoint file {self.folder / name} is missing (listed in {self.path}); "
                                      f"restore it, or use an earlier checkpoint")
            if sha256_file(self.folder / name) != self.sha256[name]:
                raise CheckpointError(
                    f"checkpoint file {self.folder / name} does not match the checksum recorded when it was saved: "
                    f"it was corrupted or replaced since. Restore it (or use an earlier checkpoint)"
                )

    def check_stamp(self, name: str, found: Stamp | None) -> None:
        """File ``name`` carries the checkpoint's stamp; only a checkpoint of an older xmoe
        (neither stamps nor manifest) may have none."""
        if found is None:
            if self.stamp is not None:
                raise CheckpointError(f"checkpoint file {self.folder / name} carries no run stamp, but the other "
                                      f"files of this checkpoint do: it comes from another (older) checkpoint. "
                                      f"Restore the checkpoint's own file, or use an earlier checkpoint")
            return
        if self.stamp is None:
            what = "has no run stamp" if self.sha256 is not None else "is missing"
            raise CheckpointError(
                f"checkpoint file {self.path} {what}, but the checkpoint's files carry one: it was removed or "
                f"replaced, so they cannot be checked. Restore it, or use an earlier checkpoint"
            )
        if found != self.stamp:
            if found.run_id == self.stamp.run_id and found.step == self.stamp.step:
                what = "another config or tokenizer"
            else:
                what = found.describe()
            raise CheckpointError(
                f"checkpoint file {self.folder / name} belongs to {what}, not to this checkpoint "
                f"({self.stamp.describe()}): it was copied in from another run or checkpoint. Restore the "
                f"checkpoint's own file, or use an earlier checkpoint"
            )

    def check_state(self, state: dict) -> None:
        """state.json names the stamp's run and step (an edited step is refused)."""
        if self.stamp is None:
            return
        if state.get("run_id") != self.stamp.run_id or state.get("step") != self.stamp.step:
            raise CheckpointError(
                f"checkpoint file {self.folder / 'state.json'} says step {state.get('step')} of run "
                f"{str(state.get('run_id'))[:12]}, but the checkpoint's files were saved at {self.stamp.describe()}: "
                f"state.json was edited or copied from another checkpoint. Restore it, or use an earlier checkpoint"
            )

    def check_config(self, text: str) -> None:
        """config.json is the one the checkpoint's files were saved with."""
        if self.stamp is not None and sha256_text(text) != self.stamp.config_sha256:
            raise CheckpointError(
                f"checkpoint file {self.folder / 'config.json'} is not the config the checkpoint's files were saved "
                f"with (another config, from another run?); put the matching config.json back"
            )

    def check_run_files(self) -> None:
        """The run-folder files the checkpoint needs (its tokenizer) are the ones it was saved with."""
        if self.stamp is None:
            return
        run_dir = self.folder.parent
        for name, digest in sorted(self.stamp.files.items()):
            path = run_dir / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint in {self.folder} needs the {name} it was "
                                      f"trained with; copy it from the run that wrote the checkpoint")
            if sha256_file(path) != digest:
                raise CheckpointError(
                    f"{path} is not the {name} the checkpoint in {self.folder} was trained with (another run's?); "
                    f"it would change every token. Put the run's own {name} back, or start a new run"
                )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict, or a CheckpointError naming it."""
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
