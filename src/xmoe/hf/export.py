"""``xmoe export-hf``: an xmoe language-model run written as an ordinary Hugging Face folder.

The folder holds ``config.json`` (an XMoEConfig with ``auto_map`` and the xmoe version),
``model.safetensors``, self-contained modeling code (xmoe.hf.standalone: configuration_xmoe.py,
xmoe_layer.py, modeling_xmoe.py; torch and transformers only), the run's tokenizer as a
``PreTrainedTokenizerFast`` and a model card (README.md: what XMoE is, the dial, the run's last
validation numbers), so that

    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)          # it reads config.json too
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # or after `import xmoe.hf`

work where xmoe is not installed (with ``import xmoe.hf``, the model runs xmoe's own layers). Every LM run kind exports the same way: trained MoE (threshold or top-k
routers), split-FFN (split8-*) and dense runs, and dense runs converted by ``xmoe convert``; a
Hugging Face GPT-2 / LLaMA-style model converted by ``xmoe convert`` becomes an
XMoEConvertedForCausalLM folder (modeling_xmoe_converted.py) the same way.

The folder is written beside ``out`` and renamed into place; an existing export at ``out`` is
replaced only once the new one is complete, so a failure never destroys it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

from torch import nn

from xmoe.checkpoint_kind import XMOE_MODEL_TYPES, checkpoint_kind, hugging_face_config
from xmoe.conversion.layer import new_folder
from xmoe.errors import UsageError, is_disk_full

from .configuration_xmoe import XMoEConfig, XMoEConvertedConfig
from .modeling_xmoe import XMoEForCausalLM, capacity_mismatch
from .modeling_xmoe_converted import XMoEConvertedForCausalLM


def is_xmoe_folder(path: str | os.PathLike) -> bool:
    """A Hugging Face folder holding an xmoe export (config.json with model_type "xmoe" or
    "xmoe_converted")."""
    return (hugging_face_config(path) or {}).get("model_type") in XMOE_MODEL_TYPES


def export_model(model: nn.Module, out: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None,
                 eot_token: str | None = None, results: dict | None = None, dropless: bool = False) -> Path:
    """Write the xmoe GPT ``model`` (with the byte-level BPE ``tokenizer_file`` written by xmoe's
    data pipeline, whose ``eot_token`` ends documents) as a Hugging Face folder at ``out``;
    ``results``: the training run's numbers for the model card (e.g. its last validation row).

    A folder routes dropless (its modeling code has no capacity). A model that evaluates with
    capacity (``eval_capacity_factor``) is refused unless ``dropless``: then it is written to
    route dropless, as ``xmoe eval`` routes models trained with the presets."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = None
    special = {}
    if tokenizer_file is not None:
        # The end-of-text token pads too (GPT-2's convention), so that batches can be padded.
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eot_token, bos_token=eot_token,
                                            pad_token=eot_token)
        if eot_token is not None:
            eot_id = tokenizer.convert_tokens_to_ids(eot_token)
            special = {"eos_token_id": eot_id, "bos_token_id": eot_id, "pad_token_id": eot_id}
    cfg = model.cfg
    if dropless and cfg.moe is not None:
        try:
            cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, eval_capacity_factor=None))
        except ValueError as err:  # static mode's bound was the capacity (MoEConfig says what to set instead)
            raise UsageError(f"--dropless: this model cannot route dropless as configured: {err}") from None
    hf_model = XMoEForCausalLM(XMoEConfig.from_gpt_config(cfg, **special))
    if (mismatch := capacity_mismatch(hf_model)) is not None:
        raise UsageError(mismatch)
    hf_model.transformer.load_state_dict(model.state_dict())
    return _write(out, hf_model, tokenizer, model_card(hf_model, results))


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, dropless: bool = False) -> Path:
    """Export the ``xmoe train`` (or ``xmoe convert``) run at ``checkpoint`` to the folder ``out``
    (``dropless``: export_model)."""
    from xmoe.data import TOKENIZER_FILE
    from xmoe.data.tokenizer import EOT
    from xmoe.tasks.lm import load_lm

    kind = checkpoint_kind(checkpoint)
    if kind.kind == "converted":
        return export_converted(checkpoint, out)
    if kind.kind in ("hf", "hf-dense"):  # a missing folder named like a Hub id ("runs/a") is a run not there
        raise UsageError(f"{checkpoint} is already a Hugging Face model ({kind.what}); there is nothing to export")
    loaded = load_lm(checkpoint, device="cpu")
    return export_model(loaded.model, out, tokenizer_file=loaded.run_dir / TOKENIZER_FILE, eot_token=EOT,
                        results=_last_validation(loaded.run_dir), dropless=dropless)


def export_converted(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export a Hugging Face GPT-2 / LLaMA-style model converted by ``xmoe convert`` (a folder
    with xmoe_conversion.json) as an XMoEConvertedForCausalLM folder, with its tokenizer."""
    from xmoe.conversion.hf import CONVERSION_FILE, load_converted, load_tokenizer

    meta = json.loads((Path(folder) / CONVERSION_FILE).read_text())
    model = load_converted(folder)
    tokenizer = load_tokenizer(folder)
    base = model.config.to_dict()
    special = {key: base.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = XMoEConvertedConfig(base=base, converted_modules=meta["modules"], moe=meta["moe"],
                                 moe_output_bias=meta["bias"], **special)
    hf_model = XMoEConvertedForCausalLM(config).to(next(model.parameters()).dtype)
    hf_model.model.load_state_dict(model.state_dict())
    return _write(out, hf_model, tokenizer, model_card(hf_model, None))


def _write(out: str | os.PathLike, model, tokenizer, card: str) -> Path:
    """``model.save_pretrained``, ``tokenizer.save_pretrained`` (if any) and the model ``card``
    into ``out`` (xmoe.conversion.layer.new_folder): complete, or not at all; an earlier export
    there is replaced only once the new one is written."""
    out = Path(out)
    if out.exists() and not is_xmoe_folder(out):
        raise UsageError(
            f"--out {out} exists and is not an xmoe Hugging Face export; choose a new folder (an existing export "
            f"is replaced, anything else is left alone)"
        )
    try:
        with new_folder(out, replace=True) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card)
    except BaseException as err:
        if not is_disk_full(err):
            raise
        earlier = f"; the earlier export in {out} is intact" if out.exists() else ""
        raise OSError(errno.ENOSPC, f"no space left while writing the export {out} ({err}){earlier}. Free "
                                    f"some space, then export again") from None
    return out


def _last_validation(run_dir: Path) -> dict | None:
    """The last validation row of the run's metrics.jsonl (None without one)."""
    from xmoe.training import read_metrics

    path = run_dir / "metrics.jsonl"
    rows = [row for row in read_metrics(path) if row.get("split") == "val"] if path.exists() else []
    return rows[-1] if rows else None


def model_card(model, results: dict | None) -> str:
    """The folder's README.md: what XMoE is, the model, the dial, how to load it, the run's numbers."""
    config = model.config
    moe = config.moe or {}
    budgeted = config.moe_threshold is None and moe.get("router", "threshold") == "threshold"
    if not moe:
        dial = "This model is dense (no MoE layer); it has no dial."
    elif moe.get("router") == "topk":
        dial = f"This model routes each token to its top-{moe['top_k']} experts (the top-k baseline); it has no threshold dial."
    else:
        now = ("each layer's t as its compute-budget controller left it in training (`moe_threshold: null`; "
               "set a number to route every layer at that t)" if budgeted else f"t = {config.moe_threshold:g}")
        dial = (f"`config.moe_threshold` is the threshold t: each token takes the smallest set of its most probable "
                f"experts whose router probabilities add up to t (at least one). Lower t: fewer experts per token, "
                f"less compute; t = 1 engages all {moe['num_experts']}. The model reads it at every call, so "
                f"`model.config.moe_threshold = 0.7` takes effect at once and `save_pretrained` keeps it; "
                f"`from_pretrained(DIR, trust_remote_code=True, moe_threshold=0.7)` loads at 0.7. Saved: {now}. "
                f"`num_experts_per_tok` = {config.num_experts_per_tok} is the top-k reference the experts per token "
                f"compare with (FLOPs), not a limit.")
    if config.model_type == "xmoe":
        shape = (f"An XMoE GPT: {config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads, context "
                 f"{config.block_size} tokens, vocabulary {config.vocab_size}")
    else:
        shape = f"A Hugging Face {config.base['model_type']} model whose FFNs `xmoe convert` split into experts"
    if moe:
        shape += (f"; MoE layers: {moe['num_experts']} experts of width {moe['expert_dim']} "
                  f"({moe['activation']}), {moe.get('router', 'threshold')} router")
    lines = [
        "---", "library_name: transformers", "tags: [xmoe, mixture-of-experts, custom_code]", "---", "",
        "# XMoE model", "",
        f"Written by xmoe {config.xmoe_version}. XMoE (Yang et al., 2024, \"XMoE: Sparse Models with Fine-grained and "
        f"Adaptive Expert Selection\", arXiv 2403.18926) uses many small experts behind a threshold router: a token "
        f"takes as many experts as its router needs to reach a probability mass t, so easy tokens cost less.", "",
        f"{shape}.", "", "## The dial", "", dial, "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'tokenizer = AutoTokenizer.from_pretrained("DIR", trust_remote_code=True)  # reads config.json: no prompt',
        'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)', "```", "",
        "The modeling code in this folder needs only torch and transformers. With xmoe installed, `import xmoe.hf` "
        "first loads the same weights into xmoe's own layers (faster expert kernels), without remote code.",
    ]
    if results:
        lines += ["", "## Training run", "", "The run's last validation:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in results.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return "\n".join(lines) + "\n"

