"""``xmoe export-hf``: an xmoe language-model run written as an ordinary Hugging Face folder.

The folder holds ``config.json`` (an XMoEConfig with ``auto_map``), ``model.safetensors``, the
modeling code (configuration_xmoe.py, modeling_xmoe.py: ``trust_remote_code`` loading) and the
run's tokenizer as a ``PreTrainedTokenizerFast``, so that

    AutoTokenizer.from_pretrained(DIR)
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # or after `import xmoe.hf`

work with xmoe installed. Every LM run kind exports the same way: trained MoE (threshold or top-k
routers), split-FFN (split8-*) and dense runs, and dense runs converted by ``xmoe convert``; a
Hugging Face GPT-2 / LLaMA-style model converted by ``xmoe convert`` becomes an
XMoEConvertedForCausalLM folder (modeling_xmoe_converted.py) the same way.

The folder is written beside ``out`` and renamed into place; an existing export at ``out`` is
replaced only once the new one is complete, so a failure never destroys it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from xmoe.errors import UsageError, is_disk_full

from .configuration_xmoe import XMoEConfig
from .modeling_xmoe import XMoEForCausalLM
from .modeling_xmoe_converted import XMoEConvertedConfig, XMoEConvertedForCausalLM

XMOE_MODEL_TYPES = (XMoEConfig.model_type, XMoEConvertedConfig.model_type)


def is_xmoe_folder(path: str | os.PathLike) -> bool:
    """A Hugging Face folder holding an xmoe export (config.json with model_type "xmoe" or
    "xmoe_converted")."""
    return _model_type(Path(path)) in XMOE_MODEL_TYPES


def export_model(model: nn.Module, out: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None,
                 eot_token: str | None = None) -> Path:
    """Write the xmoe GPT ``model`` (with the byte-level BPE ``tokenizer_file`` written by xmoe's
    data pipeline, whose ``eot_token`` ends documents) as a Hugging Face folder at ``out``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = None
    special = {}
    if tokenizer_file is not None:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eot_token, bos_token=eot_token)
        if eot_token is not None:
            eot_id = tokenizer.convert_tokens_to_ids(eot_token)
            special = {"eos_token_id": eot_id, "bos_token_id": eot_id}
    hf_model = XMoEForCausalLM(XMoEConfig.from_gpt_config(model.cfg, **special))
    hf_model.transformer.load_state_dict(model.state_dict())
    return _write(out, hf_model, tokenizer)


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the ``xmoe train`` (or ``xmoe convert``) run at ``checkpoint`` to the folder ``out``."""
    from xmoe.conversion.hf import is_converted_folder, is_hf_folder
    from xmoe.data import TOKENIZER_FILE
    from xmoe.data.tokenizer import EOT
    from xmoe.tasks.lm import load_lm

    if is_converted_folder(checkpoint):
        return export_converted(checkpoint, out)
    if is_hf_folder(checkpoint):
        raise UsageError(f"{checkpoint} is already a Hugging Face model folder (config.json); there is nothing to export")
    loaded = load_lm(checkpoint, device="cpu")
    return export_model(loaded.model, out, tokenizer_file=loaded.run_dir / TOKENIZER_FILE, eot_token=EOT)


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
    return _write(out, hf_model, tokenizer)


def _write(out: str | os.PathLike, model, tokenizer) -> Path:
    """``model.save_pretrained`` and ``tokenizer.save_pretrained`` (if any) into a new folder
    beside ``out``, then renamed to ``out``: complete, or not at all; an earlier export there is
    replaced only once the new one is written."""
    out = Path(out)
    if out.exists() and not is_xmoe_folder(out):
        raise UsageError(
            f"--out {out} exists and is not an xmoe Hugging Face export; choose a new folder (an existing export "
            f"is replaced, anything else is left alone)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent)) / "export"
            out.rename(old)
        tmp.rename(out)
    except BaseException as err:
        if old is not None and not out.exists():
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            earlier = f"; the earlier export in {out} is intact" if out.exists() else ""
            raise OSError(errno.ENOSPC, f"no space left while writing the export {out} ({err}){earlier}. Free "
                                        f"some space, then export again") from None
        raise
    finally:
        if old is not None:  # the replaced export, or an empty folder once it was moved back
            shutil.rmtree(old.parent, ignore_errors=True)
    return out


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
