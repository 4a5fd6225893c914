"""GPT: a GPT-2-style decoder-only language model whose FFNs are, in every ``moe_every``-th
layer, XMoE layers.

References: GPT-2 (Radford et al., 2019): pre-LN, learned positional embeddings, input and
output embeddings tied, GeLU FFN with biases, init N(0, 0.02) with residual projections scaled
by 1/sqrt(2 n_layer); nanoGPT's model.py for the layout. XMoE (Yang et al., 2024,
arXiv 2403.18926, Sec. 4): MoE replaces the FFN of layers 2, 4, ..., 12 of GPT-2 small. The
paper's model sizes and MoE families are presets, in xmoe.presets.gpt.

The model returns the *unscaled* sum of the MoE layers' balancing losses; the training loop
forms ``loss + 0.01 * aux_loss`` (the paper's coefficient). No training or file IO here.

Shape legend: B batch, L sequence length, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.moe import MoELayer, MoEOutput, RoutingStats

from .config import GPTConfig
from .counts import FlopsPerToken, flops_breakdown, flops_per_token, gpt_params
from .layers import Block, KVCache, init_gpt2_

# GPTConfig and the counts of a config are torch-free (xmoe.models.config, .counts); the model's
# module exports them as well, as the one place to import GPT's pieces from.
__all__ = ["GPT", "IGNORE_INDEX", "FlopsPerToken", "GPTConfig", "GPTOutput", "flops_breakdown", "flops_per_token",
           "moe_flops_per_token", "num_params"]

IGNORE_INDEX = -100  # target value that the loss skips (torch's cross_entropy default)


@dataclass(frozen=True)
class GPTOutput:
    """The model's output. The router losses are summed over the MoE layers when first read, as
    each layer computes its own (MoEOutput): generation, which reads none, pays for none."""

    logits_BLV: Tensor  # next-token logits at every position, in the compute dtype
    loss: Tensor | None  # fp32 mean cross-entropy over targets != IGNORE_INDEX; None without targets
    moe_outputs: tuple[MoEOutput, ...] = field(repr=False)  # one per MoE layer, in layer order

    @property
    def stats(self) -> tuple[RoutingStats, ...]:
        """One per MoE layer, in layer order."""
        return tuple(o.stats for o in self.moe_outputs)

    @cached_property
    def aux_loss(self) -> Tensor:
        """fp32 scalar: sum over MoE layers of the *unscaled* balancing loss; 0 if dense."""
        return self._sum("aux_loss")

    @cached_property
    def z_loss(self) -> Tensor:
        """fp32 scalar: sum over MoE layers of the router z-loss; 0 if dense."""
        return self._sum("z_loss")

    @cached_property
    def entropy_loss(self) -> Tensor:
        """fp32 scalar: sum over MoE layers of the mean router entropy; 0 if dense."""
        return self._sum("entropy_loss")

    def _sum(self, loss: str) -> Tensor:
        zero = torch.zeros((), dtype=torch.float32, device=self.logits_BLV.device)
        return sum((getattr(o, loss) for o in self.moe_outputs), zero)


class GPT(nn.Module):
    """Token + position embeddings -> n_layer pre-LN blocks (MoE FFN at cfg.moe_layer_indices) ->
    final LayerNorm -> logits through the tied token embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        moe_indices = set(cfg.moe_layer_indices)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                d_model=cfg.d_model,
                n_head=cfg.n_head,
                d_ff=cfg.d_ff,
                dropout=cfg.dropout,
                moe=cfg.moe if i in moe_indices else None,
                causal=True,
                layer_idx=i,
                layer_norm_eps=cfg.layer_norm_eps,
                moe_output_bias=cfg.moe_output_bias,
            )
            for i in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        init_gpt2_(self, std=cfg.init_std, num_layers=cfg.n_layer)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in layer order (same order as ``GPTOutput.stats``)."""
        return [b.ffn for b in self.blocks if b.is_moe]

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding (buffers are allocated on first use)."""
        return KVCache(num_layers=self.cfg.n_layer, max_len=self.cfg.block_size)

    def forward(self, idx_BL: Tensor, targets: Tensor | None = None, cache: KVCache | None = None, *,
                positions_BL: Tensor | None = None, attn_mask: Tensor | None = None,
                token_mask_BL: Tensor | None = None) -> GPTOutput:
        """Logits for token ids ``idx_BL`` [B, L]; with ``targets`` [B, L], the mean CE too.

        With ``cache``, ``idx_BL`` continues the tokens already in it (positions
        ``cache.position ..``), and the cache advances by L. The cache needs eval mode.
        Padded batches (xmoe.hf): ``positions_BL`` replaces those positions, ``attn_mask``
        (bool, broadcastable to [B, H, L, S]) limits attention, ``token_mask_BL`` (bool, True =
        a real token) keeps pad tokens out of the MoE layers.
        """
        B, L = idx_BL.shape
        start = 0
        if cache is not None:
            if self.training:
                raise UsageError(
                    "GPT.forward got a KV cache in training mode; call model.eval() first (in "
                    "training, MoE capacity makes a token's routing depend on the whole batch, so "
                    "incremental decoding would not match a full forward)"
                )
            start = cache.position
        last = start + L if positions_BL is None else int(positions_BL.max()) + 1
        if last > self.cfg.block_size:
            raise UsageError(
                f"sequence of {last} positions is longer than GPTConfig.block_size="
                f"{self.cfg.block_size}; crop the input to the last block_size tokens"
            )
        if positions_BL is None:
            positions_BL = torch.arange(start, start + L, device=idx_BL.device)
        x_BLD = self.drop(self.wte(idx_BL) + self.wpe(positions_BL))
        moe_outputs = []
        for block in self.blocks:
            x_BLD, moe_out = block(x_BLD, attn_mask=attn_mask, cache=cache, moe_mask=token_mask_BL)
            if moe_out is not None:
                moe_outputs.append(moe_out)
        if cache is not None:
            cache.advance(L)
        logits_BLV = self.lm_head(self.ln_f(x_BLD))

        loss = None
        if targets is not None:
            # fp32 log-softmax: the loss of a bf16 model's logits would round badly over V.
            loss = F.cross_entropy(
                logits_BLV.float().reshape(B * L, -1), targets.reshape(B * L), ignore_index=IGNORE_INDEX
            )
        return GPTOutput(logits_BLV=logits_BLV, loss=loss, moe_outputs=tuple(moe_outputs))

    @torch.no_grad()
    def generate(
        self,
        idx_BL: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx_BL``: [B, L + max_new_tokens].

        Runs in eval mode (restoring the previous mode after), so MoE layers are dropless and a
        token's routing is exactly that of a full forward pass. Decodes incrementally with a KV
        cache; once the context fills ``block_size``, each step re-reads the last ``block_size``
        tokens from scratch (what cropping the context means with absolute positions).
        ``temperature == 0`` is greedy; ``top_k`` keeps the k likeliest tokens, ``top_p`` the
        smallest set whose probability reaches top_p (nucleus sampling).
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if idx_BL.ndim != 2 or idx_BL.shape[1] == 0:
            raise UsageError(f"generate needs a [B, L] prompt with L >= 1, got shape {tuple(idx_BL.shape)}")
        if any(layer.router.dial.eval_capacity_factor is not None for layer in self.moe_layers()):
            warnings.warn(
                "a MoE layer has eval_capacity_factor set, so generation routes with capacity: a "
                "token's experts can differ from a full forward pass; use eval_capacity_factor=None",
                stacklevel=2,
            )
        was_training = self.training
        self.eval()
        try:
            block = self.cfg.block_size
            cache = self.new_cache()
            pending_BL = idx_BL[:, -block:]  # tokens not yet in the cache
            for _ in range(max_new_tokens):
                if cache.position + pending_BL.shape[1] > block:
                    cache = self.new_cache()
                    pending_BL = idx_BL[:, -block:]
                logits_BV = self(pending_BL, cache=cache).logits_BLV[:, -1, :].float()
                next_B1 = _sample(logits_BV, temperature, top_k, top_p, generator)
                idx_BL = torch.cat([idx_BL, next_B1], dim=1)
                pending_BL = next_B1
        finally:
            self.train(was_training)
        return idx_BL


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, *,
                   flags: bool = False) -> None:
    """Refuses a setting generate cannot sample with (xmoe generate checks it for every kind of
    model, before loading one: transformers' own checks are tracebacks, and some let top_p > 1
    pass). ``flags``: name the settings as the command's flags (--top-k), not as arguments."""
    def name(argument: str) -> str:
        return "--" + argument.replace("_", "-") if flags else argument

    unset = "" if flags else " or None"
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"{name('max_new_tokens')} must be a non-negative integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise UsageError(f"{name('temperature')} must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise UsageError(f"{name('top_k')} must be a positive integer{unset}, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UsageError(f"{name('top_p')} must be in (0, 1]{unset}, got {top_p!r}")


def _sample(
    logits_BV: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row: [B, 1]."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop_sorted_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, num_samples=1, generator=generator)


# --- parameter and FLOP counts (of a config: xmoe.models.counts) ------------------------------


def num_params(model_or_cfg: nn.Module | GPTConfig, *, non_embedding: bool = False) -> int:
    """Parameters of a model, or of the GPT a config builds (counted without building it).

    Tied embeddings count once. ``non_embedding=True`` leaves out the position embeddings (as
    nanoGPT reports; the token embeddings are also the output layer, so they stay).
    """
    if isinstance(model_or_cfg, GPTConfig):
        return gpt_params(model_or_cfg, non_embedding=non_embedding)
    total = sum(p.numel() for p in model_or_cfg.parameters())  # parameters() skips tied duplicates
    if non_embedding and isinstance(model_or_cfg, GPT):
        total -= model_or_cfg.wpe.weight.numel()
    return total


def moe_flops_per_token(cfg: GPTConfig, experts_per_token: float | Tensor | Sequence[float | Tensor]) -> float:
    """Expert FLOPs per token actually activated, summed over the MoE layers, from the measured
    mean experts per token of each layer (e.g. ``[s.kept_per_token for s in out.stats]``), or
    one number for every layer. Same count as ``RoutingStats.expert_flops_per_token``, summed."""
    if cfg.moe is None:
        raise UsageError("moe_flops_per_token needs a MoE config; GPTConfig.moe is None (dense)")
    num_moe = len(cfg.moe_layer_indices)
    if isinstance(experts_per_token, (int, float, Tensor)):
        experts_per_token = [experts_per_token] * num_moe
    if len(experts_per_token) != num_moe:
        raise UsageError(
            f"experts_per_token has {len(experts_per_token)} values, the config has {num_moe} MoE "
            f"layers; give one mean per MoE layer (or one number for all)"
        )
    return sum(float(e) for e in experts_per_token) * cfg.moe.flops_per_pair
