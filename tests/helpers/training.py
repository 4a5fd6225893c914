"""The tiny language-model run config the training tests share, and a by-hand cross entropy."""

from __future__ import annotations

from xmoe.data import DataConfig
from xmoe.training import TrainConfig
from xmoe.tasks.lm import LMRunConfig, lm_run_config


def tiny_lm_config(corpus, tmp_path, overrides: dict[str, str] | None = None, **train) -> LMRunConfig:
    """debug-xmoe on ``corpus`` for 6 steps (``train`` overrides TrainConfig fields, ``overrides``
    any dotted field); dropout 0.1, so that an exact resume must restore the RNG too."""
    train = {"max_steps": 6, "batch_size": 4, "seq_len": 32, "eval_every": 0, "save_every": 3,
             "log_every": 1, "eval_batches": 2, "lr": 3e-3, **train}
    return lm_run_config(
        "debug-xmoe",
        data=DataConfig(path=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(**train),
        overrides={"model.dropout": "0.1", **(overrides or {})},
    )


def cross_entropy_by_hand(model, batches) -> tuple[float, int]:
    """Summed next-token cross entropy (nats, from float64 logits) and the token count of
    ``batches``: the reference evaluations are checked against, not xmoe's evaluate_lm."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for x_BL, y_BL in batches:
            logits = model(x_BL).logits_BLV.double()
            total += F.cross_entropy(logits.flatten(0, 1), y_BL.flatten(), reduction="sum").item()
            count += y_BL.numel()
    return total, count


def recompute_manifest(folder) -> None:
    """What an attacker (or a careless copy) does after changing the files of checkpoint folder
    ``folder``: a manifest whose checksums fit them again (its run stamp is kept)."""
    import hashlib
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json")
    manifest["sha256"] = {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    (folder / "manifest.json").write_text(json.dumps(manifest))
