"""Transformer pieces shared by the models: self-attention with a KV cache, the dense FFN, and a
pre-LN block whose FFN is either dense or an XMoE layer.

References: the pre-LN GPT-2 block (Radford et al., 2019, "Language Models are Unsupervised
Multitask Learners"; layer norm before each sub-layer, a final one after the stack) with its
initialisation (normal, std 0.02; residual output projections scaled by 1/sqrt(2 n_layer)), and
XMoE (Yang et al., 2024, arXiv 2403.18926), where a MoE layer replaces the FFN of some blocks.

Shape legend:
    B batch, L new positions (the query length), S key positions (cached + new),
    H attention heads, A head dim (D / H), D model dim, F FFN hidden dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.moe import MoEConfig, MoELayer, MoEOutput


class KVCache:
    """Keys and values of every layer for the ``position`` tokens decoded so far.

    Buffers are allocated on first use, with the batch size, dtype and device of the first keys
    written, so the cache follows the model wherever it runs. Each forward writes its new
    positions ``[position, position + L)`` in every layer, then the model calls ``advance(L)``.
    Inference only: in training mode a MoE layer's capacity would make routing depend on the
    batch, so the models refuse a cache then.
    """

    def __init__(self, *, num_layers: int, max_len: int) -> None:
        if num_layers < 1 or max_len < 1:
            raise UsageError(f"KVCache needs num_layers >= 1 and max_len >= 1, got {num_layers}, {max_len}")
        self.max_len = max_len
        self.position = 0
        self._k_BHSA: list[Tensor | None] = [None] * num_layers
        self._v_BHSA: list[Tensor | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self._k_BHSA)

    def update(self, layer: int, k_BHLA: Tensor, v_BHLA: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values of ``layer`` after the cached ones; return all of them."""
        start, end = self.position, self.position + k_BHLA.shape[2]
        if end > self.max_len:
            raise UsageError(
                f"KVCache holds {self.max_len} positions (the model's block_size) and is asked for "
                f"{end}; start a new cache, or crop the context to the last {self.max_len} tokens"
            )
        if self._k_BHSA[layer] is None:
            B, H, _, A = k_BHLA.shape
            self._k_BHSA[layer] = k_BHLA.new_empty(B, H, self.max_len, A)
            self._v_BHSA[layer] = v_BHLA.new_empty(B, H, self.max_len, A)
        k_BHSA, v_BHSA = self._k_BHSA[layer], self._v_BHSA[layer]
        if k_BHSA.shape[0] != k_BHLA.shape[0]:
            raise UsageError(
                f"KVCache was started with batch size {k_BHSA.shape[0]}, got {k_BHLA.shape[0]}; "
                f"use one cache per batch"
            )
        k_BHSA[:, :, start:end] = k_BHLA
        v_BHSA[:, :, start:end] = v_BHLA
        return k_BHSA[:, :, :end], v_BHSA[:, :, :end]

    def advance(self, num_positions: int) -> None:
        self.position += num_positions

    def reorder(self, index_B: Tensor) -> None:
        """Keep batch rows ``index_B`` of every layer (beam search: each hypothesis continues one
        of the previous step's hypotheses)."""
        for i, (k_BHSA, v_BHSA) in enumerate(zip(self._k_BHSA, self._v_BHSA)):
            if k_BHSA is not None:
                self._k_BHSA[i] = k_BHSA.index_select(0, index_B)
                self._v_BHSA[i] = v_BHSA.index_select(0, index_B)


class SelfAttention(nn.Module):
    """Multi-head self-attention, fused QKV projection, ``F.scaled_dot_product_attention``.

    ``causal=True``: position i attends to positions <= i, also across a KV cache (the new
    queries sit at absolute positions ``cache.position + 0 .. L - 1``). ``attn_mask``: an extra
    boolean mask broadcastable to [B, H, L, S], True where attention is allowed (e.g. padding).
    """

    def __init__(
        self, d_model: int, n_head: int, dropout: float, *, causal: bool, layer_idx: int = 0
    ) -> None:
        super().__init__()
        assert d_model % n_head == 0, "the model config checks d_model % n_head"
        self.n_head = n_head
        self.dropout = dropout
        self.causal = causal
        self.layer_idx = layer_idx  # this layer's slot in a KVCache
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)  # a residual output projection

    def forward(self, x_BLD: Tensor, *, attn_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        B, L, D = x_BLD.shape
        H = self.n_head
        q_BLD, k_BLD, v_BLD = self.qkv(x_BLD).split(D, dim=-1)
        q_BHLA, k_BHLA, v_BHLA = (t.view(B, L, H, D // H).transpose(1, 2) for t in (q_BLD, k_BLD, v_BLD))
        past = 0
        if cache is not None:
            past = cache.position
            k_BHLA, v_BHLA = cache.update(self.layer_idx, k_BHLA, v_BHLA)  # now S = past + L keys
        mask, is_causal = _attention_mask(self.causal, attn_mask, L, past, x_BLD.device)
        y_BHLA = F.scaled_dot_product_attention(
            q_BHLA,
            k_BHLA,
            v_BHLA,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.proj(y_BHLA.transpose(1, 2).reshape(B, L, D))


def _attention_mask(
    causal: bool, attn_mask: Tensor | None, num_new: int, num_past: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The (mask, is_causal) pair for SDPA. SDPA's ``is_causal`` aligns the triangle top-left,
    which is only right without a cache; with one, the new queries see every cached key."""
    if not causal:
        return attn_mask, False
    if attn_mask is None and num_past == 0:
        return None, True
    if attn_mask is None and num_new == 1:
        return None, False  # one new query at the end sees every key
    S = num_past + num_new
    causal_LS = torch.ones(num_new, S, dtype=torch.bool, device=device).tril(diagonal=num_past)
    return (causal_LS if attn_mask is None else causal_LS & attn_mask), False


class FeedForward(nn.Module):
    """The dense FFN: Linear(D, F) -> GeLU -> Linear(F, D), both with biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)  # a residual output projection

    def forward(self, x_BLD: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x_BLD)))


class Block(nn.Module):
    """Pre-LN block: ``x + drop(attn(ln_1(x)))``, then ``x + drop(ffn(ln_2(x)))``.

    The FFN is a MoELayer when ``moe`` is given, else a dense FeedForward; ``moe_output_bias``
    adds one shared bias after a MoE layer. ``forward`` returns
    the new hidden states and the MoE layer's output (for its losses and statistics), or None.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        d_ff: int,
        dropout: float,
        moe: MoEConfig | None,
        causal: bool,
        layer_idx: int,
        layer_norm_eps: float = 1e-5,
        moe_output_bias: bool = False,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attn = SelfAttention(d_model, n_head, dropout, causal=causal, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.ffn: nn.Module = MoELayer(moe) if moe is not None else FeedForward(d_model, d_ff)
        # One bias added after the MoE output, not per expert: a converted dense FFN's output bias
        # (see GPTConfig.moe_output_bias). Starts at 0.
        self.ffn_bias = nn.Parameter(torch.zeros(d_model)) if moe is not None and moe_output_bias else None
        self.drop = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(
        self, x_BLD: Tensor, *, attn_mask: Tensor | None = None, cache: KVCache | None = None,
        moe_mask: Tensor | None = None,
    ) -> tuple[Tensor, MoEOutput | None]:
        """``moe_mask`` (bool [B, L], True = a real token): pad tokens the MoE layer never routes."""
        x_BLD = x_BLD + self.drop(self.attn(self.ln_1(x_BLD), attn_mask=attn_mask, cache=cache))
        h_BLD = self.ln_2(x_BLD)
        if self.is_moe:
            moe_out = self.ffn(h_BLD, moe_mask)
            y_BLD = moe_out.output if self.ffn_bias is None else moe_out.output + self.ffn_bias
            return x_BLD + self.drop(y_BLD), moe_out
        return x_BLD + self.drop(self.ffn(h_BLD)), None


@torch.no_grad()
def init_gpt2_(module: nn.Module, *, std: float, num_layers: int) -> None:
    """GPT-2 initialisation of every Linear / Embedding / LayerNorm in ``module``, in place.

    Linear and Embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0); then each residual
    output projection (attention ``proj``, FFN ``down``, and the experts' down projection ``w2``)
    is multiplied by 1/sqrt(2 * num_layers), so the residual stream's variance does not grow
    with depth. The MoE router and expert weights keep the init of their MoEConfig (``init_std``,
    independent or identical experts); only the experts' ``w2`` is scaled, like ``down``.
    """
    scale = 1.0 / math.sqrt(2 * num_layers)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()
    for m in module.modules():
        if isinstance(m, SelfAttention):
            m.proj.weight.mul_(scale)
        elif isinstance(m, FeedForward):
            m.down.weight.mul_(scale)
        elif isinstance(m, MoELayer):
            m.experts.w2.mul_(scale)
