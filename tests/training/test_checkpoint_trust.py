"""Checkpoint folders from someone else: loading one never runs code it carries, and every file
of a checkpoint is checked before it is used (missing, truncated, swapped, or from another
run), with an error that names the file and what to do.

The attacks are real: each payload is first shown to run under the loader it targets (plain
``pickle.load``, torch.distributed.checkpoint's own reader), then shown not to under xmoe's.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from xmoe.distributed import SingleProcess
from xmoe.models.gpt import GPT
from xmoe.training import CheckpointError, lm_run_config, load_checkpoint, save_checkpoint, to_dict
from xmoe.training.checkpoint import CONFIG_HASH_KEY, consolidate_checkpoint, save_sharded_checkpoint
from xmoe.training.shards import read_metadata


class TouchOnUnpickle:
    """A pickle payload: unpickling it runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def recompute_manifest(folder: Path) -> None:
    """What an attacker (or a careless copy) does after changing files: a manifest that fits."""
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json")
    manifest["sha256"] = {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def debug_model() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    cfg = lm_run_config("debug-xmoe")
    return GPT(cfg.model), to_dict(cfg)


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A sharded (torch.distributed.checkpoint) checkpoint of one process, with the optimizer
    state of one step; returns its checkpoint folder (the weights are those of debug_model)."""
    model, config = debug_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    return save_sharded_checkpoint(tmp_path / "run", model, optimizer, parallel=SingleProcess(), step=1,
                                   config=config)


def fresh_model() -> torch.nn.Module:
    return debug_model()[0]


# --- item 1: no code from a checkpoint runs ---------------------------------------------------


def test_a_real_sharded_checkpoint_loads_through_the_restricted_reader(sharded):
    model = fresh_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_checkpoint(sharded, model)
    for (name, a), (_, b) in zip(fresh_model().state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("where", ["whole file", "inside real metadata"])
def test_crafted_metadata_runs_no_code(sharded, tmp_path, where):
    marker = tmp_path / f"pwned-{where.replace(' ', '-')}"
    metadata_file = sharded / "dcp" / ".metadata"
    if where == "whole file":
        payload = pickle.dumps(TouchOnUnpickle(marker))
    else:  # a genuine Metadata object carrying the payload in one of its fields
        metadata = read_metadata(metadata_file)
        metadata.planner_data = {"model.wte.weight": TouchOnUnpickle(marker)}
        payload = pickle.dumps(metadata)
    pickle.loads(payload)  # the payload is real: plain unpickling (what DCP does) runs it
    assert marker.exists()
    marker.unlink()

    metadata_file.write_bytes(payload)
    recompute_manifest(sharded)
    for load in (lambda: load_checkpoint(sharded, fresh_model()), lambda: consolidate_checkpoint(sharded)):
        with pytest.raises(CheckpointError, match=r"\.metadata names posix\.system.*refusing to load it"):
            load()
        assert not marker.exists()


def test_a_crafted_value_in_a_shard_runs_no_code(sharded, tmp_path):
    """The other unpickling in DCP: non-tensor values go through torch.load(weights_only=False)."""
    marker = tmp_path / "pwned"
    metadata_file = sharded / "dcp" / ".metadata"
    metadata = read_metadata(metadata_file)
    index = next(i for i in metadata.storage_data if i.fqn == CONFIG_HASH_KEY)
    info = metadata.storage_data[index]
    shard = sharded / "dcp" / info.relative_path
    payload = pickle.dumps(TouchOnUnpickle(marker))
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    metadata_file.write_bytes(pickle.dumps(metadata))
    recompute_manifest(sharded)

    # The payload is real: torch's own reader runs it.
    with pytest.raises(BaseException):
        dcp.load({CONFIG_HASH_KEY: ""}, storage_reader=FileSystemReader(sharded / "dcp"), no_dist=True)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=f"{shard.name}: its value '{CONFIG_HASH_KEY}' holds objects other"):
        load_checkpoint(sharded, fresh_model())
    assert not marker.exists()


def test_a_shard_path_outside_the_folder_is_refused(sharded, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x" * 10_000_000)
    metadata_file = sharded / "dcp" / ".metadata"
    metadata = read_metadata(metadata_file)
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path=str(outside))
    metadata_file.write_bytes(pickle.dumps(metadata))
    recompute_manifest(sharded)
    with pytest.raises(CheckpointError, match="points outside its folder"):
        load_checkpoint(sharded, fresh_model())


def test_torch_load_is_weights_only_everywhere_in_the_package():
    """The single-file kind's optimizer.pt and rng.pt, and anything else: every torch.load call
    in xmoe passes weights_only=True."""
    calls = []
    for path in (Path(__file__).parents[2] / "src" / "xmoe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((path.name, node.lineno, safe))
    assert calls, "no torch.load found: the scan is broken"
    assert [call for call in calls if not call[2]] == []
