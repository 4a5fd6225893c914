"""Reading a sharded checkpoint (torch.distributed.checkpoint, "DCP") without running its code.

DCP unpickles two things from a checkpoint folder: ``.metadata``, with a plain ``pickle.load``
(``FileSystemReader.read_metadata``), and every non-tensor value it stored (the optimizer's
hyper-parameters, xmoe's strings), with ``torch.load(weights_only=False)``
(``DefaultLoadPlanner.load_bytes``). Unpickling calls whatever the file names, so a crafted
folder would run its author's code on `xmoe eval`, `export-hf` or `--resume`, and a checksum
beside it is no defence: it can be recomputed.

``ShardReader``, a ``FileSystemReader``, closes both:

- ``.metadata`` goes through an unpickler that resolves only ``METADATA_GLOBALS``, the
  globals real metadata names (DCP's metadata dataclasses and enum, ``torch.Size``, dtypes,
  layouts, ``pathlib`` paths); anything else is refused before it is called;
- every non-tensor value is checked by torch's weights-only unpickler before the planner
  unpickles it;
- every shard file the metadata points to must be a file of the folder itself (no other path),
  holding the bytes the metadata places in it; a shard that cannot be read as the metadata says
  (truncated, swapped, from another checkpoint) is named in the error.

Every refusal is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner

from xmoe.errors import CheckpointError

METADATA_FILE = ".metadata"

# Every global a DCP .metadata file names (found by unpickling those of xmoe's own sharded
# checkpoints, FSDP's DTensors and expert shards included), besides torch's dtypes.
METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a torch.layout from its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
})

_TRUST = "it was not written by xmoe (or was altered): use a checkpoint you trust"


class ShardReader(FileSystemReader):
    """A ``FileSystemReader`` that never unpickles anything but DCP's own metadata and plain
    values, and reads only shard files of its own folder (see the module docstring). The
    metadata is read and checked when the reader is made, before DCP runs: a refusal is a
    ``CheckpointError`` here, not an error DCP logs and wraps."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.metadata = read_metadata(self.folder / METADATA_FILE)
        _check_shard_files(self.metadata, self.folder)

    @property
    def folder(self) -> Path:
        return Path(self.path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The metadata read (and checked) when this reader was made."""
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        """Each shard file's reads on their own, so that a failure names the file; every
        non-tensor value checked before ``planner`` unpickles it."""
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                checked = _CheckedValues(planner, self.folder / name)
                super().read_data(dataclasses.replace(plan, items=items), checked).wait()
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(
                    f"checkpoint shard {self.folder / name} does not hold what {METADATA_FILE} says it holds "
                    f"({type(err).__name__}: {str(err)[:200]}): it is damaged, or was swapped with another "
                    f"shard or another checkpoint's. Restore the checkpoint's files together, or use an earlier one"
                ) from None
        future = torch.futures.Future()
        future.set_result(None)
        return future


def read_metadata(path: Path) -> Metadata:
    """A DCP ``.metadata`` file, unpickled with only ``METADATA_GLOBALS`` (and dtypes) allowed."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; restore it, or use an earlier checkpoint") from None
    except Exception as err:  # what a truncated or garbled pickle raises varies: EOFError, UnpicklingError, ...
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted ({type(err).__name__}: "
                              f"{str(err)[:200]}); restore it, or use an earlier checkpoint") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(metadata).__name__}, not a sharded "
                              f"checkpoint's metadata; {_TRUST}")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _check_shard_files(metadata: Metadata, folder: Path) -> None:
    """Every shard file ``metadata`` names is a file of ``folder`` (no other path), long enough
    for the bytes placed in it."""
    path = folder / METADATA_FILE
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        if not (isinstance(info, _StorageInfo) and isinstance(info.offset, int) and isinstance(info.length, int)):
            raise CheckpointError(f"checkpoint file {path} holds no valid shard table; {_TRUST}")
        name = info.relative_path
        if not isinstance(name, str) or os.path.basename(name) != name or name.startswith("."):
            raise CheckpointError(f"checkpoint file {path} points outside its folder ({name!r}); {_TRUST}")
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"checkpoint shard {shard} is missing ({METADATA_FILE} lists tensors in it); "
                                  f"restore it from where the checkpoint came from, or use an earlier checkpoint")
        if shard.stat().st_size < end:
            raise CheckpointError(f"checkpoint shard {shard} is truncated ({shard.stat().st_size} bytes, "
                                  f"{METADATA_FILE} places data up to byte {end}); restore it, or use an "
                                  f"earlier checkpoint")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals of METADATA_GLOBALS and torch's dtypes; refuses the rest
    before anything is called."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(
            f"checkpoint file {self._path} names {module}.{name}, which sharded checkpoint metadata never "
            f"holds; refusing to load it (unpickling it could run code): {_TRUST}"
        )


class _CheckedValues:
    """``planner`` whose ``load_bytes`` first checks the value with torch's weights-only
    unpickler (plain containers, numbers, strings, tensors), so the planner's own unpickling
    (``weights_only=False``) only ever meets values that passed."""

    def __init__(self, planner: LoadPlanner, shard: Path) -> None:
        self._planner, self._shard = planner, shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"checkpoint shard {self._shard}: its value {read_item.dest_index.fqn!r} holds objects other than "
                f"plain values and tensors; refusing to load it (unpickling it could run code): {_TRUST} "
                f"({str(err).splitlines()[0][:200]})"
            ) from None
        value.seek(0)
        self._planner.load_bytes(read_item, value)
