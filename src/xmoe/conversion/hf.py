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
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from xmoe.moe import MoEConfig, MoELayer

from .ffn import DenseFFN
from .layer import ConversionConfig, LayerReport, capture_inputs, convert_ffn

CONVERSION_FILE = "xmoe_conversion.json"
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
    try:
        import transformers
    except ImportError as err:
        raise ImportError("converting Hugging Face models needs transformers: pip install 'xmoe[hf]'") from err
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
        raise ValueError(
            f"no GPT-2 (c_fc/c_proj) or LLaMA-style (gate_proj/up_proj/down_proj) FFN found in "
            f"{type(model).__name__}; only those two layouts can be converted"
        )
    return found


def _activation(name: str | None, *, gated: bool) -> str:
    act = _ACTIVATIONS.get(name or "")
    if act is None or (act == "swiglu") != gated:
        kind = "a gated (SwiGLU) FFN needs silu" if gated else "a GPT-2 FFN needs gelu_new, gelu or relu"
        raise ValueError(f"cannot convert an FFN with activation {name!r}: {kind}")
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


def convert_hf_folder(path: str | os.PathLike, calibration_BL: Tensor, cfg: ConversionConfig) -> tuple[nn.Module, list[LayerReport]]:
    """Load a causal LM saved in the local folder ``path`` (``save_pretrained``; nothing is
    downloaded) and convert it."""
    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a folder; give a local folder written by save_pretrained")
    model = _transformers().AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, convert_hf(model, calibration_BL, cfg)


def save_converted(model: nn.Module, out: str | os.PathLike) -> Path:
    """Write a converted model to the new folder ``out``: its HF config, the weights
    (safetensors) and where the converted FFNs sit with their MoE config."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder")
    converted = {name: m for name, m in model.named_modules() if isinstance(m, ConvertedMLP)}
    if not converted:
        raise ValueError("the model has no converted FFN; run convert_hf first")
    first = next(iter(converted.values()))
    meta = {"modules": list(converted), "moe": dataclasses.asdict(first.moe.cfg), "bias": first.bias is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE))
        (tmp / CONVERSION_FILE).write_text(json.dumps(meta, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_converted(path: str | os.PathLike) -> nn.Module:
    """A model written by ``save_converted``, in eval mode."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / CONVERSION_FILE).is_file():
        raise ValueError(f"{path} holds no converted model ({CONVERSION_FILE} is missing); write one with save_converted")
    meta = json.loads((path / CONVERSION_FILE).read_text())
    tf = _transformers()
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(path, local_files_only=True))
    moe = MoEConfig(**meta["moe"])
    for name in meta["modules"]:
        bias = torch.zeros(moe.model_dim) if meta["bias"] else None
        _replace(model, name, ConvertedMLP(MoELayer(moe), bias))
    load_model(model, str(path / WEIGHTS_FILE))
    return model.eval()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
