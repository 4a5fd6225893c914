"""Convert one dense FFN into an XMoE layer: partition its neurons, split it, fit the router.

The model-specific modules (gpt.py, hf.py) read each FFN's weights into a ``DenseFFN``, capture
its inputs on calibration text, and call ``convert_ffn``; they then put the returned MoELayer in
the FFN's place and add the dense output bias once (ffn.py, equation (1)), and write the result
through ``new_folder``.

Shape legend: T calibration tokens, D model dim, F FFN width, E experts, G = F / E.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from xmoe.errors import UsageError, check_counts
from xmoe.moe import MoELayer
from xmoe.moe.config import check_threshold

from .ffn import DenseFFN, expert_config, group_contributions, split_into
from .partition import PARTITIONS, check_divides, clustered_partition, contiguous_partition
from .router_fit import RouterFitConfig, fit_router, router_targets


@dataclass(frozen=True, kw_only=True)
class ConversionConfig:
    """How to turn each dense FFN into ``num_experts`` experts of width d_ff / num_experts.

    partition: "contiguous" or "clustered" (co-activation clusters, see partition.py).
    threshold: t stored in the converted model; 1.0 engages every expert, where the converted
        model equals the dense one. Lower it at inference (``xmoe eval --threshold``).
    cluster_tokens: at most this many calibration tokens (a random subset) describe each neuron
        for clustering.
    """

    num_experts: int
    partition: str = "contiguous"
    threshold: float = 1.0
    cluster_tokens: int = 4096
    router: RouterFitConfig = field(default_factory=RouterFitConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        check_counts("ConversionConfig", num_experts=self.num_experts, cluster_tokens=self.cluster_tokens)
        if self.partition not in PARTITIONS:
            raise UsageError(f"ConversionConfig.partition={self.partition!r} is not one of {', '.join(PARTITIONS)}")
        check_threshold(self.threshold)


@dataclass(frozen=True)
class LayerReport:
    """How the conversion of one FFN went (saved as conversion.json)."""

    router_loss: float  # cross-entropy of the fitted router to the contribution shares
    target_entropy: float  # the same for a perfect router: the floor of router_loss
    top1_agreement: float  # tokens whose top router expert is the group carrying most output
    groups: list[list[int]]  # the partition: neurons of each expert


@torch.no_grad()
def convert_ffn(ffn: DenseFFN, x_TD: Tensor, cfg: ConversionConfig) -> tuple[MoELayer, LayerReport]:
    """The MoELayer equal to ``ffn`` at t >= 1, with a router fitted on the FFN inputs ``x_TD``."""
    check_divides(ffn.d_ff, cfg.num_experts)
    x_TD = x_TD.to(ffn.w1_DF.dtype)
    if cfg.partition == "contiguous":
        groups_EG = contiguous_partition(ffn.d_ff, cfg.num_experts)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        subset = torch.randperm(x_TD.shape[0], generator=generator)[: cfg.cluster_tokens]
        groups_EG = clustered_partition(ffn.hidden(x_TD[subset.to(x_TD.device)]).cpu(), cfg.num_experts, seed=cfg.seed)
    groups_EG = groups_EG.to(ffn.w1_DF.device)
    layer = MoELayer(expert_config(ffn, cfg.num_experts, threshold=cfg.threshold))
    layer.to(device=ffn.w1_DF.device, dtype=ffn.w1_DF.dtype)
    split_into(layer, ffn, groups_EG)
    fit = fit_router(x_TD, router_targets(group_contributions(ffn, x_TD, groups_EG)), cfg.router)
    layer.router.weight.copy_(fit.weight_ED)
    return layer, LayerReport(fit.loss, fit.entropy, fit.top1_agreement, groups_EG.tolist())


@torch.no_grad()
def capture_inputs(modules: list[nn.Module], forward: Callable[[Tensor], object], batches: Iterable[Tensor]) -> list[Tensor]:
    """The inputs each of ``modules`` receives while ``forward(batch)`` runs the model on each of
    ``batches``: one [T, D] tensor per module. Forward hooks, removed afterwards."""
    seen: list[list[Tensor]] = [[] for _ in modules]

    def hook(index: int):
        return lambda module, args, output: seen[index].append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        for batch in batches:
            forward(batch)
    finally:
        for h in handles:
            h.remove()
    if not seen or not seen[0]:
        raise UsageError("the calibration text gave no tokens; give more calibration text")
    return [torch.cat(chunks) for chunks in seen]


def even_windows(tokens, num_tokens: int, seq_len: int, *, what: str = "the calibration text",
                 asked: str = "--calibration-tokens") -> Tensor:
    """``num_tokens`` tokens (rounded down to whole sequences of ``seq_len``) as [B, L] windows
    spread evenly over the token sequence ``tokens`` (any 1-D sequence of ints). ``what`` and
    ``asked`` (the option that sets ``num_tokens``) name things in the error."""
    count = min(num_tokens, len(tokens)) // seq_len
    if len(tokens) < seq_len:
        raise UsageError(f"{what} has {len(tokens)} tokens, fewer than one sequence of {seq_len}; give more text with --data")
    if count == 0:
        raise UsageError(f"{asked} asks for {num_tokens} tokens, fewer than one sequence of {seq_len}; ask for more")
    starts = np.linspace(0, len(tokens) - seq_len, count).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


@contextlib.contextmanager
def new_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write a model folder into, renamed to ``out`` when the
    block ends and removed on any error: ``out`` appears complete or not at all. With
    ``replace``, an existing ``out`` is replaced only once the new folder is complete (and put
    back if the rename fails); without, an ``out`` that appeared meanwhile is an error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = None
    try:
        yield tmp
        if out.exists() and not replace:
            raise UsageError(f"--out {out} appeared while it was being written; nothing was written there")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent)) / "replaced"
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:  # the replaced folder, or an empty folder once it was moved back
            shutil.rmtree(old.parent, ignore_errors=True)
