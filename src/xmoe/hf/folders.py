"""Evaluating Hugging Face MoE folders at several thresholds: what ``xmoe eval``,
``xmoe sweep-threshold`` and ``xmoe generate`` do on a folder written by ``xmoe export-hf`` (the
dial is ``xmoe.moe.set_threshold``) or on a pretrained MoE model folder of a family ``adaptive``
supports (the dial is ``adaptive``; without a threshold the model runs its own top-k), and,
through ``measure``, on a model converted by ``xmoe convert``.

Each point (xmoe.sweep.SweepPoint) reports perplexity on held-out text, experts per token (mean,
and a histogram summed over the MoE layers), the MoE FLOPs ratio and tokens/s of the forward
passes, timed in the same process.

Shape legend: B windows, L window length, V vocabulary, E experts.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
from torch import Tensor, nn

from xmoe.checkpoint_kind import XMOE_MODEL_TYPES, checkpoint_kind
from xmoe.errors import UsageError
from xmoe.sweep import LayerCounts, SweepPoint, measure_layers, sweep

from .adaptive import SUPPORTED_FAMILIES, adaptive, experts_per_token, moe_routers, own_top_k


def load_folder(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """The model in the Hugging Face folder ``path`` (or behind the Hub id ``path``: see
    xmoe.checkpoints), in eval mode, and its model_type: "xmoe" / "xmoe_converted" for an
    ``xmoe export-hf`` folder, or a supported MoE family's; a UsageError naming anything else."""
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoint_kind(path)
    hub = checkpoint.kind == "hub"
    if not hub:  # refused before its weights are read
        _check_family(path, checkpoint.model_type)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=not hub, output_loading_info=True)
    except OSError as err:
        if not hub:
            raise
        raise UsageError(f"{path} is no local folder, so it was taken for a Hugging Face Hub id, and transformers "
                         f"could not load it ({err}); check the id and the network, or give a local folder") from None
    model_type = model.config.model_type
    _check_family(path, model_type)
    mismatch = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(name)}
    if mismatch:
        details = "; ".join(f"{name.replace('_', ' ')}: {', '.join(map(str, sorted(keys, key=str)[:4]))}"
                            for name, keys in mismatch.items())
        raise UsageError(f"{path}: its config.json does not describe its weights ({details}); the model would "
                         f"run with freshly initialised layers. Use the config.json exported with the weights")
    return model.to(device).eval(), model_type


def _check_family(path: str | os.PathLike, model_type: str | None) -> None:
    """A UsageError unless ``model_type`` is an ``xmoe export-hf`` folder's or a supported MoE family's."""
    if model_type in XMOE_MODEL_TYPES or model_type in SUPPORTED_FAMILIES:
        return
    supported = f"an `xmoe export-hf` folder or a Hugging Face {', '.join(SUPPORTED_FAMILIES)} model folder"
    held = "no Hugging Face model (no config.json naming a model_type)" if model_type is None else \
        f"a Hugging Face {model_type!r} model"
    raise UsageError(f"{path} holds {held}; this command takes {supported}")


def set_dial(model: nn.Module, threshold: float | None, max_experts: int | None = None) -> str:
    """Route ``model`` at ``threshold`` (None: as loaded); returns the routing's label."""
    if model.config.model_type in XMOE_MODEL_TYPES:
        from xmoe.moe import set_threshold

        if max_experts is not None:
            raise UsageError("--max-experts applies to pretrained MoE models; an xmoe model's cap is its config")
        if threshold is None:
            trained = [layer.threshold for layer in model.moe_layers() if layer.router.dial.controlled]
            if trained:  # a compute budget's t, one per layer
                return "t per layer " + ", ".join(f"{t:.3g}" for t in trained) + " (as trained)"
            return f"t={model.moe_threshold:g} (as saved)" if model.moe_threshold is not None else "dense"
        if set_threshold(model, threshold) == 0:
            raise UsageError("--threshold: the model has no threshold-routed MoE layer")
        return f"t={threshold:g}"
    if threshold is None:
        if max_experts is not None:
            raise UsageError("--max-experts needs --threshold (the model's own top-k has its own k)")
        return f"top-{own_top_k(model)} (the model's own)"
    adaptive(model, threshold=threshold, max_experts=max_experts)
    return f"t={threshold:g}" + (f", at most {max_experts}" if max_experts else "")


@torch.no_grad()
def measure(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> SweepPoint:
    """Perplexity, experts per token, MoE FLOPs ratio and tokens/s of ``model`` as its dial is
    set, on (inputs, targets) [B, L] pairs (xmoe.sweep.measure_layers, its forwards timed). The
    ratio's baseline is the model's own top-k (a MoE family), or the top-k budget of its MoE
    layers (xmoe's own layers: an export, a converted model)."""
    device = next(model.parameters()).device
    model(batches[0][0][:1].to(device), use_cache=False)  # warm-up, not timed
    seconds = 0.0

    def timed_logits(model: nn.Module, x_BL: Tensor) -> Tensor:
        nonlocal seconds
        start = time.perf_counter()
        logits_BLV = model(x_BL, use_cache=False).logits
        seconds += time.perf_counter() - start
        return logits_BLV

    if moe_routers(model):  # a MoE family's routers, counted by adaptive's hooks
        with experts_per_token(model) as counts:
            point = measure_layers(model, batches, timed_logits)
        point = dataclasses.replace(point, experts_per_token=counts.mean, histogram=tuple(counts.histogram),
                                    moe_flops_ratio=counts.mean / own_top_k(model))
    else:  # xmoe's MoE layers, counted by measure_layers
        point = measure_layers(model, batches, timed_logits)
    return dataclasses.replace(point, tokens_per_second=point.tokens / seconds)


def count_experts(model: nn.Module):
    """A context manager whose value's ``histogram`` counts the experts each (token, MoE layer)
    pair engaged while it is open."""
    return experts_per_token(model) if moe_routers(model) else LayerCounts(model)


def sweep_folder(model: nn.Module, batches: list[tuple[Tensor, Tensor]], thresholds: list[float], *,
                 max_experts: int | None = None) -> list[SweepPoint]:
    """The model as loaded (its own top-k, or its saved t), then each threshold, on the same batches."""
    own = dataclasses.replace(measure(model, batches), routing=set_dial(model, None))

    def dial(threshold: float) -> str | None:
        routing = set_dial(model, threshold, max_experts)
        return routing if max_experts is not None else None  # a plain t labels itself

    return [own, *sweep(thresholds, lambda: measure(model, batches), dial)]
