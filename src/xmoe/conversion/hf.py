"""Convert Hugging Face causal LMs with GPT-2 or LLaMA-style FFNs (needs ``pip install 'xmoe[hf]'``).

Two FFN layouts are recognised, by their submodules:

- GPT-2 style: ``c_fc``, ``c_proj`` (transformers' Conv1D, weight [in, out], ``x @ W + b``) and
  the activation of ``config.activation_function`` (GPT-2's ``gelu_new`` is the tanh GeLU).
- LLaMA style (LLaMA, Mistral, Qwen2, ...): ``gate_proj``, ``up_proj``, ``down_proj``
  (nn.Linear, weight [out, in], no biases unless ``mlp_bias``) with ``silu``: SwiGLU,
  ``down(silu(gate x) * up x)``; gate is the experts' w1, up their w3.

Each FFN module is replaced, in place, by a ``ConvertedMLP``: the XMoE layer holding its neurons
split into experts (ffn.py) plus its output bias added once. transformers is imported only when
a function here runs, so xmoe works without it.

Shape legend: B sequences, L sequence length, T tokens, D model dim, F FFN width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from xmoe.checkpoint_kind import CONVERSION_FILE, checkpoint_kind
from xmoe.errors import UsageError
from xmoe.extras import needs_extra
from xmoe.moe import MoEConfig, MoELayer

from .ffn import DenseFFN
from .layer import ConversionConfig, LayerReport, capture_inputs, convert_ffn, even_windows, new_folder

WEIGHTS_FILE = "model.safetensors"
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "swiglu", "swish": "swiglu"}


class ConvertedMLP(nn.Module):
    """Stands in for a Hugging Face MLP: ``moe(x).output + bias`` (the bias added once)."""

    def __init__(self, moe: MoELayer, bias_D: Tensor | None) -> None:
        super().__init__()
        self.moe = moe
        self.bias = nn.Parameter(bias_D.detach().clone()) if bias_D is not None else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        y = self.moe(hidden_states).output
        return y if self.bias is None else y + self.bias


def _transformers():
    with needs_extra("hf", "converting Hugging Face models"):
        import transformers
    return transformers


def find_ffns(model: nn.Module) -> list[tuple[str, DenseFFN]]:
    """(module name, weights) of every GPT-2 or LLaMA-style FFN in ``model``, in order."""
    config = getattr(model, "config", None)
    found = []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("c_fc", "c_proj")) and module.c_fc.weight.ndim == 2:
            act = _activation(getattr(config, "activation_function", None), gated=False)
            found.append((name, DenseFFN(activation=act, w1_DF=module.c_fc.weight, b1_F=module.c_fc.bias,
                                         w2_FD=module.c_proj.weight, b2_D=module.c_proj.bias)))
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            act = _activation(getattr(config, "hidden_act", None), gated=True)
            g, u, d = module.gate_proj, module.up_proj, module.down_proj
            found.append((name, DenseFFN(activation=act, w1_DF=g.weight.T, b1_F=g.bias, w3_DF=u.weight.T,
                                         b3_F=u.bias, w2_FD=d.weight.T, b2_D=d.bias)))
    if not found:
        raise UsageError(
            f"no GPT-2 (c_fc/c_proj) or LLaMA-style (gate_proj/up_proj/down_proj) FFN found in "
            f"{type(model).__name__}; only those two layouts can be converted"
        )
    return found


def _activation(name: str | None, *, gated: bool) -> str:
    act = _ACTIVATIONS.get(name or "")
    if act is None or (act == "swiglu") != gated:
        kind = "a gated (SwiGLU) FFN needs silu" if gated else "a GPT-2 FFN needs gelu_new, gelu or relu"
        raise UsageError(f"cannot convert an FFN with activation {name!r}: {kind}")
    return act


@torch.no_grad()
def convert_hf(model: nn.Module, calibration_BL: Tensor, cfg: ConversionConfig, *,
               batch_size: int = 8) -> list[LayerReport]:
    """Convert every FFN of the Hugging Face causal LM ``model`` in place (routers fitted on the
    FFN inputs the dense model produces on token ids ``calibration_BL``). Returns a report per FFN."""
    model.eval()
    ffns = find_ffns(model)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    inputs = capture_inputs([modules[name] for name, _ in ffns], lambda x_BL: model(input_ids=x_BL.to(device)),
                            calibration_BL.split(batch_size))
    reports = []
    for (name, ffn), x_TD in zip(ffns, inputs):
        layer, report = convert_ffn(ffn, x_TD, cfg)
        _replace(model, name, ConvertedMLP(layer, ffn.b2_D))
        reports.append(report)
    return reports


def save_converted(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, extra: dict | None = None) -> Path:
    """Write a converted model to the new folder ``out``: its HF config, the weights
    (safetensors), where the converted FFNs sit with their MoE config (plus ``extra``, e.g. the
    conversion's reports), and the ``tokenizer`` if given. ``out`` appears complete or not at all."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists; choose a new folder")
    converted = {name: m for name, m in model.named_modules() if isinstance(m, ConvertedMLP)}
    if not converted:
        raise UsageError("the model has no converted FFN; run convert_hf first")
    first = next(iter(converted.values()))
    dtype = str(first.moe.router.weight.dtype).removeprefix("torch.")  # the FFNs' dtype (bf16 models stay bf16)
    meta = {"modules": list(converted), "moe": dataclasses.asdict(first.moe.cfg), "bias": first.bias is not None,
            "dtype": dtype, **(extra or {})}
    with new_folder(out) as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE))
        (tmp / CONVERSION_FILE).write_text(json.dumps(meta, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def load_converted(path: str | os.PathLike) -> nn.Module:
    """A model written by ``save_converted``, in eval mode."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / CONVERSION_FILE).is_file():
        raise UsageError(f"{path} holds no converted model ({CONVERSION_FILE} is missing); write one with save_converted")
    meta = json.loads((path / CONVERSION_FILE).read_text())
    tf = _transformers()
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(path, local_files_only=True))
    dtype = getattr(torch, meta["dtype"]) if "dtype" in meta else next(model.parameters()).dtype
    install_converted(model, meta["modules"], MoEConfig(**meta["moe"]), bias=meta["bias"], dtype=dtype)
    load_model(model, str(path / WEIGHTS_FILE))
    return model.eval()


def install_converted(model: nn.Module, modules: list[str], moe: MoEConfig, *, bias: bool,
                      dtype: torch.dtype | None = None) -> None:
    """Put a ConvertedMLP of ``moe`` (its weights still to be loaded) in place of each FFN named
    in ``modules``: the converted model's architecture."""
    for name in modules:
        _replace(model, name, ConvertedMLP(MoELayer(moe), torch.zeros(moe.model_dim) if bias else None).to(dtype))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in the local folder ``path`` (``tokenizer.save_pretrained``), or a
    Hugging Face Hub id's (xmoe.checkpoint_kind)."""
    fix = f"save the model's tokenizer there with tokenizer.save_pretrained({str(path)!r})"
    hub = checkpoint_kind(path).kind == "hub"
    # Checked first: given only config.json, transformers may build an empty tokenizer silently.
    if not hub and not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); {fix}")
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=not hub)
    except (OSError, ValueError) as err:
        raise UsageError(f"the tokenizer in {path} could not be loaded ({err}); {fix}") from err


def text_tokens(tokenizer, data: str | os.PathLike, limit: int | None = None) -> list[int]:
    """The documents at ``data`` (a text file, a .jsonl file or a folder, as for training)
    through ``tokenizer``, joined by its end-of-text token where it has one. With ``limit``,
    tokenizing stops at the first line break after ``limit`` tokens, so a big corpus costs
    only what is used."""
    from xmoe.data.corpus import load_corpus

    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens: list[int] = []
    for document in load_corpus(str(data)):
        pieces = list(_pieces(document))
        for i, piece in enumerate(pieces):
            tokens += tokenizer(piece, verbose=False)["input_ids"] + (separator if i == len(pieces) - 1 else [])
            if limit is not None and len(tokens) >= limit:
                return tokens
    return tokens


def _pieces(text: str, size: int = 1 << 16):
    """``text`` in pieces of about ``size`` characters, cut after a line break where there is one."""
    start = 0
    while start < len(text):
        stop = text.rfind("\n", start, start + size) + 1 if start + size < len(text) else len(text)
        stop = stop if stop > start else min(start + size, len(text))
        yield text[start:stop]
        start = stop


def context_length(model: nn.Module, longest: int) -> int:
    """``longest``, or less when the model's positions stop sooner (an exported converted model:
    the original model's)."""
    config = model.config.get_text_config()
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return min(longest, limit) if limit else longest


def text_batches(folder: str | os.PathLike, data: str | os.PathLike, model: nn.Module, *, max_batches: int,
                 batch_size: int, seq_len: int) -> list[tuple[Tensor, Tensor]]:
    """Up to ``max_batches`` batches of ``batch_size`` (inputs, targets) windows of ``seq_len``
    tokens (fewer if the model's context is shorter) spread over the text at ``data``, through
    the tokenizer in ``folder``."""
    L = context_length(model, seq_len) + 1  # inputs and their next tokens
    tokens = text_tokens(load_tokenizer(folder), data, limit=4 * max_batches * batch_size * L)
    windows = even_windows(tokens, max_batches * batch_size * L, L, what="the evaluation text", asked="--max-batches")
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


def convert_hf_checkpoint(folder: str | os.PathLike, out: str | os.PathLike, cfg: ConversionConfig, *,
                          data: str | os.PathLike | None, calibration_tokens: int = 16384,
                          seq_len: int = 256, device: str | torch.device = "cpu") -> tuple[Path, list[LayerReport]]:
    """Convert the causal LM and tokenizer saved in ``folder`` and write the converted model,
    with the tokenizer and the conversion's reports, to the new folder ``out``.

    Calibration text is ``data`` through the model's own tokenizer, as windows of ``seq_len``
    tokens (fewer if the model's context is shorter) spread over the text. Nothing is written
    when an input is wrong.
    """
    out = Path(out)
    if out.exists():
        raise UsageError(f"--out {out} already exists; conversion writes a new folder: choose another --out")
    if data is None:
        raise UsageError(
            f"{folder} is a Hugging Face model, which brings no training text: give calibration text "
            f"with --data FILE (a text file, .jsonl or folder; a few thousand tokens of text like the model's)"
        )
    if not isinstance(calibration_tokens, int) or calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be a positive integer, got {calibration_tokens!r}")
    if not Path(folder).is_dir():
        raise UsageError(f"{folder} is not a folder; give a local folder written by save_pretrained")
    tokenizer = load_tokenizer(folder)
    model = _transformers().AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device)
    # Windows spread over (up to) four times the tokens they need.
    tokens = text_tokens(tokenizer, data, limit=4 * calibration_tokens)
    calibration_BL = even_windows(tokens, calibration_tokens, context_length(model, seq_len))
    reports = convert_hf(model, calibration_BL, cfg)
    extra = {"converted_from": str(folder), "config": dataclasses.asdict(cfg), "calibration_data": str(data),
             "calibration_tokens": int(calibration_BL.numel()), "layers": [dataclasses.asdict(r) for r in reports]}
    return save_converted(model.cpu(), out, tokenizer=tokenizer, extra=extra), reports


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
