"""What a --checkpoint holds is decided in one place (xmoe.checkpoint_kind), from small files,
and a command given the wrong kind names the command that takes it."""

from __future__ import annotations

import json
import re

import pytest

from xmoe.checkpoint_kind import checkpoint_kind
from xmoe.checkpoints import expect
from xmoe.errors import CheckpointError, UsageError


def _write(path, name: str, content: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(content or {}))
    return path


@pytest.fixture
def folders(tmp_path):
    return {
        "run": _write(tmp_path / "run" / "checkpoint", "state.json", {"step": 3}).parent,
        "checkpoint folder": _write(tmp_path / "run2" / "checkpoint", "state.json", {"step": 3}),
        "converted": _write(_write(tmp_path / "conv", "config.json", {"model_type": "gpt2"}),
                            "xmoe_conversion.json"),
        "export": _write(tmp_path / "export", "config.json", {"model_type": "xmoe"}),
        "olmoe": _write(tmp_path / "olmoe", "config.json", {"model_type": "olmoe", "num_experts": 8}),
        "mixtral": _write(tmp_path / "mixtral", "config.json", {"model_type": "mixtral", "num_local_experts": 8}),
        "dense": _write(tmp_path / "gpt2", "config.json", {"model_type": "gpt2"}),
        "multimodal": _write(tmp_path / "gemma", "config.json", {"model_type": "gemma4",
                                                                 "text_config": {"num_experts": 8}}),
        "empty": _write(tmp_path / "empty", "notes.txt"),
    }


@pytest.mark.parametrize("name, kind", [
    ("run", "run"), ("checkpoint folder", "run"), ("converted", "converted"), ("export", "hf"), ("olmoe", "hf"),
    ("mixtral", "hf"), ("multimodal", "hf"), ("dense", "hf-dense"),
])
def test_each_folder_is_one_kind(folders, name, kind):
    assert checkpoint_kind(folders[name]).kind == kind


def test_a_hub_id_is_org_slash_name_that_is_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint_kind("allenai/OLMoE-1B-7B-0924").kind == "hub"
    assert checkpoint_kind("allenai/OLMoE-1B-7B-0924").is_hugging_face
    for missing in ("missing", str(tmp_path / "runs" / "missing"), "./runs/a", "a/b/c"):
        with pytest.raises(CheckpointError, match="the folder does not exist"):
            checkpoint_kind(missing)
    (tmp_path / "org" / "name" / "checkpoint").mkdir(parents=True)
    (tmp_path / "org" / "name" / "checkpoint" / "state.json").write_text("{}")
    assert checkpoint_kind("org/name").kind == "run"  # a local folder wins over a Hub id


def test_a_folder_with_no_model_says_what_was_expected(folders):
    with pytest.raises(CheckpointError, match=r"expected .*checkpoint/state.json .* or a Hugging Face model's "
                                              r"config.json"):
        checkpoint_kind(folders["empty"])


def test_a_folder_of_runs_names_them(tmp_path):
    """`xmoe eval --checkpoint runs/demo` and `xmoe report runs/demo`: the demo's runs are one
    level down (runs/demo/xmoe, runs/demo/top2); the messages name them."""
    from xmoe.training.metrics import read_rows

    demo = tmp_path / "demo"
    for name in ("xmoe", "top2"):
        _write(demo / name / "checkpoint", "state.json", {"step": 3})
    (demo / "notes").mkdir()
    named = re.escape(f"it holds runs one level down: {demo / 'top2'}, {demo / 'xmoe'}: give one of them")
    with pytest.raises(CheckpointError, match=named):
        checkpoint_kind(demo)
    with pytest.raises(FileNotFoundError, match=named):
        read_rows(demo / "metrics.jsonl")


def test_a_file_is_refused_naming_its_folder(folders):
    weights = folders["run"] / "checkpoint" / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a file; a checkpoint is a folder.*holding this "
                                              + re.escape(f"file: {folders['run'] / 'checkpoint'})")):
        checkpoint_kind(weights)


@pytest.mark.parametrize("name, command, fix", [
    ("converted", "eval", "xmoe sweep-threshold --checkpoint"),
    ("dense", "eval", "make it sparse first: xmoe convert"),
    ("olmoe", "convert", "convert only takes a dense model"),
])
def test_a_command_refuses_a_kind_it_does_not_take_naming_the_fix(folders, name, command, fix):
    checkpoint = checkpoint_kind(folders[name])
    with pytest.raises(UsageError, match=f"is {checkpoint.what}, which `xmoe {command}` does not take; .*{fix}"):
        expect(checkpoint, ("run",), command)
    expect(checkpoint, (checkpoint.kind,), command)  # taken: no error
