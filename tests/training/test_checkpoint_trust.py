"""Checkpoint folders from someone else: loading one never runs code it carries, and every file
of a checkpoint is checked before it is used (missing, truncated, swapped, or from another
run), with an error that names the file and what to do.

The attacks are real: each payload is first shown to run under the loader it targets (plain
``pickle.load``, torch.distributed.checkpoint's own reader), then shown not to under xmoe's.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from helpers.data import write_corpus
from helpers.training import recompute_manifest, tiny_lm_config
from xmoe.distributed import SingleProcess
from xmoe.models.gpt import GPT
from xmoe.training import CheckpointError, load_checkpoint, to_dict
from xmoe.tasks.lm import LanguageModelling, lm_run_config, load_lm, train_lm
from xmoe.training.checkpoint import consolidate_checkpoint, save_sharded_checkpoint
from xmoe.training.loop import build_optimizer
from xmoe.training.runs import saved_config
from xmoe.training.shards import read_metadata


class TouchOnUnpickle:
    """A pickle payload: unpickling it runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def debug_model() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    cfg = lm_run_config("debug-xmoe")
    return GPT(cfg.model), to_dict(cfg)


def save_sharded(run: Path, step: int = 1) -> Path:
    """A sharded (torch.distributed.checkpoint) checkpoint of one process, with the optimizer
    state of one step of lr 0 (the weights are those of debug_model); its checkpoint folder."""
    model, config = debug_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    return save_sharded_checkpoint(run, model, optimizer, ranks=SingleProcess(), step=step, config=config)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return save_sharded(tmp_path / "run")


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
    key = next(k for k, meta in metadata.state_dict_metadata.items() if isinstance(meta, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == key)
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
        dcp_to_torch_save(sharded / "dcp", tmp_path / "whole.pt")
    assert marker.exists()
    marker.unlink()

    model = fresh_model()
    for load in (lambda: load_checkpoint(sharded, model, torch.optim.AdamW(model.parameters())),
                 lambda: consolidate_checkpoint(sharded)):
        with pytest.raises(CheckpointError, match=f"{shard.name}: its value '{key}' holds objects other"):
            load()
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


# --- item 2: every file checked before it is used --------------------------------------------


def test_a_missing_shard_is_named(sharded):
    (sharded / "dcp" / "__0_0.distcp").unlink()  # the manifest still lists it
    with pytest.raises(CheckpointError, match=r"dcp/__0_0\.distcp is missing \(listed in .*manifest.json\)"):
        load_checkpoint(sharded, fresh_model())
    recompute_manifest(sharded)  # and without the manifest's help: .metadata places tensors in it
    with pytest.raises(CheckpointError, match=r"shard .*__0_0\.distcp is missing \(\.metadata lists tensors in it"):
        load_checkpoint(sharded, fresh_model())


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp"])
def test_a_truncated_shard_file_is_named(sharded, name):
    path = sharded / "dcp" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    recompute_manifest(sharded)
    with pytest.raises(CheckpointError, match=rf"{name} is truncated"):
        load_checkpoint(sharded, fresh_model())


# --- items 3 and 4: every file bound to one run and step ---------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """Two finished tiny runs of the same preset and shapes, on different text and seeds."""
    root = tmp_path_factory.mktemp("two-runs")
    for name, seed in (("a", 0), ("b", 1)):
        corpus = write_corpus(root / f"{name}.txt", words=["alpha", "beta", "gamma", "delta", "tokens", name * 3])
        train_lm(tiny_lm_config(corpus, root, max_steps=2, save_every=0, seed=seed), root / name, progress=False)
    return root


@pytest.fixture
def runs(two_runs, tmp_path) -> tuple[Path, Path]:
    """Copies of the two runs, to edit."""
    shutil.copytree(two_runs, tmp_path, dirs_exist_ok=True)
    shutil.copytree(two_runs / "a", tmp_path / "pristine-a")
    return tmp_path / "a", tmp_path / "b"


def resume_load(run: Path) -> dict:
    """What --resume reads: weights, optimizer state, RNG states, state.json (into the model the
    untouched run "a" describes)."""
    cfg = saved_config(run.parent / "pristine-a", LanguageModelling)
    model = GPT(cfg.model)
    return load_checkpoint(run, model, build_optimizer(model, cfg.train), restore_rng=True)


def test_the_untouched_run_loads(runs):
    assert resume_load(runs[0])["step"] == 2


def test_another_runs_tokenizer_is_refused_by_eval_and_resume(runs):
    a, b = runs
    assert (a / "tokenizer.json").read_bytes() != (b / "tokenizer.json").read_bytes()
    shutil.copy(b / "tokenizer.json", a / "tokenizer.json")
    for load in (lambda: load_lm(a), lambda: resume_load(a)):
        with pytest.raises(CheckpointError, match=r"tokenizer.json is not the tokenizer.json .* trained with"):
            load()


@pytest.mark.parametrize("names", [["optimizer.pt"], ["rng.pt"], ["config.json"], ["model.safetensors"],
                                   ["config.json", "model.safetensors"]])
def test_another_runs_files_are_refused_even_with_a_recomputed_manifest(runs, names):
    a, b = runs
    for name in names:
        shutil.copy(b / "checkpoint" / name, a / "checkpoint" / name)
    recompute_manifest(a / "checkpoint")
    with pytest.raises(CheckpointError, match=r"(belongs to run \w+ at step 2, not to this checkpoint|"
                                              r"config.json is not the config)"):
        resume_load(a)


def test_a_state_json_with_its_step_edited_down_is_refused(runs):
    a, _ = runs
    state = json.loads((a / "checkpoint" / "state.json").read_text())
    (a / "checkpoint" / "state.json").write_text(json.dumps({**state, "step": 1}))
    recompute_manifest(a / "checkpoint")
    with pytest.raises(CheckpointError, match=r"state.json says step 1 of run .* saved at run \w+ at step 2"):
        resume_load(a)


def test_a_shard_from_another_checkpoint_is_refused(tmp_path):
    first, second = save_sharded(tmp_path / "first", step=1), save_sharded(tmp_path / "second", step=2)
    shutil.copy(first / "dcp" / "__0_0.distcp", second / "dcp" / "__0_0.distcp")
    recompute_manifest(second)
    with pytest.raises(CheckpointError, match=r"dcp/__0_0.distcp belongs to run \w+ at step 1, not to this "
                                              r"checkpoint \(run \w+ at step 2\)"):
        load_checkpoint(second, fresh_model())
