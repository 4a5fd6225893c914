"""Convert this project's dense GPT (and its checkpoints) into an XMoE GPT with threshold routers.

Every block's FFN becomes a MoE layer (``moe_every=1``) holding the same neurons split into E
experts (ffn.py), with a router fitted on calibration text (router_fit.py) and the dense output
bias kept once per block (``GPTConfig.moe_output_bias``). At t >= 1 the converted model's logits
equal the dense model's up to fp32 rounding; lower t engages fewer experts.

A converted checkpoint is an ordinary run folder (config.json, weights, tokenizer), so
``xmoe eval --checkpoint OUT --threshold 0.8`` and ``xmoe sweep-threshold`` work on it. It has no
optimizer state: it is for inference (or a new training run), not for ``--resume``.

Shape legend: B sequences, L sequence length, T tokens, D model dim.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from xmoe.checkpoint_kind import checkpoint_kind
from xmoe.data import TOKENIZER_FILE, load_eval_tokens, prepare_lm_data
from xmoe.errors import UsageError
from xmoe.models.gpt import GPT
from xmoe.models.layers import FeedForward
from xmoe.training import LoadedRun, checkpoint_dir, save_checkpoint, to_dict
from xmoe.tasks.lm import load_lm
from xmoe.training.checkpoint import read_state
from xmoe.training.manifest import hash_run_files

from .ffn import DenseFFN, expert_config
from .layer import ConversionConfig, LayerReport, capture_inputs, convert_ffn, even_windows, new_folder
from .partition import check_divides

CONVERSION_FILE = "conversion.json"


def dense_ffn(ffn: FeedForward) -> DenseFFN:
    """The weights of a GPT FeedForward (nn.Linear stores [out, in], hence the transposes)."""
    return DenseFFN(activation="gelu", w1_DF=ffn.up.weight.T, b1_F=ffn.up.bias,
                    w2_FD=ffn.down.weight.T, b2_D=ffn.down.bias)


def check_dense(model: GPT, num_experts: int, name: str = "the model") -> None:
    if model.cfg.moe is not None:
        raise UsageError(
            f"{name} is not dense: it already has MoE layers ({model.cfg.moe.num_experts} experts in layers "
            f"{[i + 1 for i in model.cfg.moe_layer_indices]}); conversion takes a dense GPT (a *-dense preset)"
        )
    check_divides(model.cfg.d_ff, num_experts)


@torch.no_grad()
def convert_gpt(model: GPT, calibration_BL: Tensor, cfg: ConversionConfig, *,
                batch_size: int = 16) -> tuple[GPT, list[LayerReport]]:
    """A new GPT with every FFN of the dense ``model`` split into experts, routers fitted on the
    FFN inputs the dense model produces on ``calibration_BL`` (token ids [B, L])."""
    check_dense(model, cfg.num_experts)
    model.eval()
    device = next(model.parameters()).device
    blocks = list(model.blocks)
    inputs = capture_inputs([b.ffn for b in blocks], lambda x_BL: model(x_BL.to(device)),
                            calibration_BL.split(batch_size))
    ffns = [dense_ffn(b.ffn) for b in blocks]
    moe = expert_config(ffns[0], cfg.num_experts, threshold=cfg.threshold)
    sparse = GPT(dataclasses.replace(model.cfg, moe_every=1, moe=moe, moe_output_bias=True)).to(device)
    dense_state = model.state_dict()
    for name, tensor in sparse.state_dict().items():
        if ".ffn" not in name:  # everything but the FFNs is the dense model's
            tensor.copy_(dense_state[name])
    reports = []
    for block, ffn, x_TD in zip(sparse.blocks, ffns, inputs):
        layer, report = convert_ffn(ffn, x_TD, cfg)
        block.ffn.load_state_dict(layer.state_dict())
        block.ffn_bias.copy_(ffn.b2_D)
        reports.append(report)
    return sparse.eval(), reports


def calibration_batch(loaded: LoadedRun, data: str | None, num_tokens: int) -> Tensor:
    """``num_tokens`` tokens (rounded down to whole sequences of the run's seq_len) as [B, L]
    windows spread evenly over the text: the run's training split, or the text at ``data``
    through the run's tokenizer."""
    L = loaded.cfg.train.seq_len
    if data is None:
        tokens = prepare_lm_data(loaded.cfg.data, loaded.run_dir).train_tokens
    else:
        tokens = load_eval_tokens(data, loaded.run_dir, cache_dir=loaded.cfg.data.cache_dir)
    return even_windows(tokens, num_tokens, L)


def convert_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, cfg: ConversionConfig, *,
                       calibration_tokens: int = 16384, data: str | None = None,
                       device: str = "auto") -> tuple[Path, list[LayerReport]]:
    """Convert the dense GPT run at ``checkpoint`` and write the converted run folder ``out``;
    returns it with a report per FFN.

    ``out`` must not exist; it appears complete or not at all (written beside it, then renamed),
    and nothing is written when an input is wrong.
    """
    out = Path(out)
    if out.exists():
        raise UsageError(f"--out {out} already exists; conversion writes a new folder: choose another --out")
    if not isinstance(calibration_tokens, int) or calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be a positive integer, got {calibration_tokens!r}")
    if checkpoint_kind(checkpoint).kind != "run":
        raise UsageError(
            f"{checkpoint} is a Hugging Face model folder (or an already converted one), not an `xmoe train` "
            f"run; convert a dense one with "
            f"`xmoe convert --checkpoint {checkpoint} --data TEXT ...` or xmoe.conversion.hf.convert_hf_checkpoint "
            f"(pip install 'xmoe[hf]')"
        )
    loaded = load_lm(checkpoint, device=device)
    check_dense(loaded.model, cfg.num_experts, name=f"the checkpoint {checkpoint}")
    model, reports = convert_gpt(loaded.model, calibration_batch(loaded, data, calibration_tokens), cfg)
    run_cfg = dataclasses.replace(
        loaded.cfg, model=model.cfg, preset=f"{loaded.cfg.preset}+convert-{cfg.num_experts}-{cfg.partition}")
    state = read_state(checkpoint_dir(checkpoint))
    with new_folder(out) as tmp:
        shutil.copyfile(loaded.run_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        save_checkpoint(tmp, model=model, optimizer=None, step=state["step"], config=to_dict(run_cfg),
                        extra={"converted_from": str(checkpoint)}, run_files=hash_run_files(tmp, [TOKENIZER_FILE]))
        summary = {"converted_from": str(checkpoint), "config": to_dict(cfg), "calibration_data": data,
                   "calibration_tokens": calibration_tokens, "layers": [dataclasses.asdict(r) for r in reports]}
        (tmp / CONVERSION_FILE).write_text(json.dumps(summary, indent=1))
    return out, reports
