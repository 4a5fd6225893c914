"""What a ``--checkpoint`` holds, decided in one place (xmoe.checkpoints opens it).

    kind        what the path is                                        opened by
    run         an `xmoe train` / `xmoe train-mt` run, or its           xmoe.tasks (lm.load_lm, mt.load_mt;
                checkpoint folder (state.json)                          each names the other kind's commands)
    converted   a Hugging Face model made sparse by `xmoe convert`      xmoe.conversion.hf.load_converted
                (xmoe_conversion.json beside config.json)
    hf          a Hugging Face MoE folder: written by `xmoe export-hf`  transformers (xmoe.hf.folders)
                (model_type xmoe), or a MoE family's (OLMoE, Mixtral..)
    hf-dense    any other Hugging Face folder: a dense model, what      transformers
                `xmoe convert` takes
    hub         ORG/NAME that is no local path: a Hugging Face Hub id,  transformers' from_pretrained
                which transformers downloads (or finds in its cache)

Deciding reads a few small files (state.json's presence, config.json) and imports nothing from
xmoe but its errors, so every layer may ask, and a command refuses the wrong kind at once.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmoe.errors import CheckpointError

KINDS = ("run", "converted", "hf", "hf-dense", "hub")
CONVERSION_FILE = "xmoe_conversion.json"  # written by xmoe.conversion.hf.save_converted
XMOE_MODEL_TYPES = ("xmoe", "xmoe_converted")  # the model_type of `xmoe export-hf` folders
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe")  # in MoE families' config.json
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

_WHAT = {
    "run": "an `xmoe train` run",
    "converted": "a converted Hugging Face model",
    "hf": "a Hugging Face MoE model",
    "hf-dense": "a Hugging Face model folder",
    "hub": "a Hugging Face Hub id",
}


@dataclass(frozen=True)
class Checkpoint:
    """A path and what it holds (``kind``: one of KINDS)."""

    path: str
    kind: str
    model_type: str | None = None  # config.json's, for "hf" and "hf-dense"

    @property
    def what(self) -> str:
        """The kind in words, for messages: "a converted Hugging Face model"."""
        return _WHAT[self.kind]

    @property
    def is_hugging_face(self) -> bool:
        """A model transformers loads (a folder or a Hub id) rather than an xmoe run."""
        return self.kind in ("hf", "hf-dense", "hub")


def checkpoint_kind(path: str | os.PathLike) -> Checkpoint:
    """What ``path`` holds (see the module's table). A path that does not exist and is no Hub id,
    or a folder that holds none of these, is a CheckpointError that says what was expected."""
    folder = Path(path)
    if not folder.exists():
        if _HUB_ID.fullmatch(str(path)):
            return Checkpoint(str(path), "hub")
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist; train one with "
                              f"`xmoe train --out {path}` (a Hugging Face Hub id is written ORG/NAME)")
    if folder.is_file():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder: the run folder `xmoe train --out` "
                              f"wrote, or a Hugging Face model's folder (the one holding this file: {folder.parent})")
    if any((candidate / "state.json").is_file()
           for candidate in (folder, folder / "checkpoint", folder / "checkpoint.previous")):
        return Checkpoint(str(path), "run")
    if (folder / CONVERSION_FILE).is_file():
        return Checkpoint(str(path), "converted")
    config = hugging_face_config(folder)
    if config is None:
        raise CheckpointError(f"no checkpoint in {path}: expected {path}/checkpoint/state.json (written by "
                              f"`xmoe train`) or a Hugging Face model's config.json{runs_inside_hint(folder)}")
    text_config = config.get("text_config") or {}  # multimodal checkpoints (Gemma-4, Qwen3.5-MoE)
    moe = config.get("model_type") in XMOE_MODEL_TYPES or any(
        config.get(field) or text_config.get(field) for field in _MOE_FIELDS)
    return Checkpoint(str(path), "hf" if moe else "hf-dense", config.get("model_type"))


def runs_inside_hint(folder: str | os.PathLike) -> str:
    """"; it holds runs one level down: A, B: give one of them" where ``folder`` is no run but
    its subfolders are (`xmoe demo --out runs/demo` trains runs/demo/xmoe and runs/demo/topK),
    else ""."""
    try:
        runs = sorted(str(child) for child in Path(folder).iterdir()
                      if (child / "checkpoint" / "state.json").is_file())
    except OSError:
        return ""
    return f"; it holds runs one level down: {', '.join(runs)}: give one of them" if runs else ""


def hugging_face_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's config.json as a dict, or None where there is none (or it is no JSON object)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
