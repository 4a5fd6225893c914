"""XMoEForCausalLM, self-contained (torch and transformers only): an XMoE GPT as a transformers
causal LM, for folders written by ``xmoe export-hf`` and loaded with ``trust_remote_code=True``.

The model (nanoGPT's layout, GPT-2's choices): token + learned position embeddings, pre-LN
blocks (``x + attn(ln_1(x))``, ``x + ffn(ln_2(x))``), a final LayerNorm, logits through the tied
token embeddings. In every ``moe_every``-th block the FFN is an XMoE layer (xmoe_layer.py: the
threshold rule, Yang et al. 2024, arXiv 2403.18926), else a dense GeLU FFN.

The transformers contract: a KV cache (``cache=`` from transformers 5.24 on,
``past_key_values=`` before; the dynamic cache), left or right padding through
``attention_mask`` (positions count real tokens only, pad tokens are attended by nobody and
routed to no expert), ``MoeCausalLMOutputWithPast`` with ``aux_loss`` (the unscaled balancing
loss summed over MoE layers) and ``router_logits`` when asked ([real tokens, E] per layer), a loss from ``labels`` that is
``CE + router_aux_loss_coef * aux_loss`` (+ ``router_entropy_loss_coef`` * mean router
entropy), and generation past ``block_size``: the window slides (each new token then re-reads
the last ``block_size`` tokens, as xmoe's own generate does with absolute positions).

The dial: ``config.moe_threshold``, read at every call.

Shape legend: B batch, L new positions, S key positions (cached + new), D model dim, H heads,
A head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_xmoe import XMoEConfig
from .xmoe_layer import MoELayer

IGNORE_INDEX = -100
# The output's cache field: "cache" from transformers 5.24 on, "past_key_values" before.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def positions_and_masks(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                        past: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """For L new tokens after ``past`` cached ones: positions [B, L], the attention mask
    [B, 1, L, S] (True = may attend; None: causal only) and the real-token mask [B, L] (None:
    no padding). Without ``position_ids``, a token's position is the number of real tokens
    before it, so a left-padded prompt sits at the same positions as the prompt alone."""
    B, L = input_ids.shape
    S = past + L
    device = input_ids.device
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask must be [batch, cached + new tokens] = [{B}, {S}] of 1 (real) and 0 "
                         f"(padding), got shape {tuple(attention_mask.shape)}")
    if attention_mask is None or bool(attention_mask.all()):
        if position_ids is None:
            position_ids = torch.arange(past, S, device=device).expand(B, L)
        return position_ids, None, None
    keys_BS = attention_mask.bool()
    if position_ids is None:
        position_ids = (keys_BS.long().cumsum(dim=-1) - 1).clamp(min=0)[:, past:]
    causal_LS = torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=past)
    own_LS = torch.eye(L, S, dtype=torch.bool, device=device).roll(past, dims=1)  # query i's own key, past + i
    # A pad query attends to itself only (a row with no key at all would give NaN, and NaN
    # values are not silenced by a zero attention weight); its output is never read.
    mask_BLS = (causal_LS & keys_BS[:, None, :]) | own_LS
    return position_ids, mask_BLS[:, None], keys_BS[:, past:]


def check_cache(cache: Cache | None) -> None:
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError(
            f"XMoE models support transformers' dynamic cache only, not {type(cache).__name__}: generate without "
            f"cache_implementation (the default, DynamicCache)")


class WindowedGenerationMixin(GenerationMixin):
    """GenerationMixin for a model with learned positions up to ``config.block_size``: once the
    sequence would pass it, the model re-reads the last ``block_size`` tokens from a fresh cache
    (what cropping the context means with absolute positions), as xmoe's generate does."""

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        block = self.config.block_size
        cache = inputs.get("cache", inputs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if past + inputs["input_ids"].shape[1] <= block:
            return inputs
        inputs["input_ids"] = input_ids[:, -block:]
        if inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = inputs["attention_mask"][:, -block:]
        inputs.pop("position_ids", None)  # counted again from the cropped mask
        if cache is not None:
            inputs["cache" if "cache" in inputs else "past_key_values"] = DynamicCache(config=self.config)
        return inputs


def causal_lm_loss(logits_BLV: Tensor, labels: Tensor) -> Tensor:
    """Mean CE of predicting ``labels[:, i + 1]`` at position i (-100 skipped), in fp32."""
    return F.cross_entropy(logits_BLV[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class SelfAttention(nn.Module):
    def __init__(self, config: XMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.layer_idx, self.dropout = config.n_head, layer_idx, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x_BLD: Tensor, mask_B1LS: Tensor | None, cache: Cache | None) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in self.qkv(x_BLD).split(D, dim=-1))
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        if mask_B1LS is None and past and L > 1:  # causal across the cache: the triangle's corner moves
            mask_B1LS = torch.ones(L, past + L, dtype=torch.bool, device=x_BLD.device).tril(diagonal=past)
        y_BHLA = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1LS, is_causal=mask_B1LS is None and not past,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y_BHLA.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, config: XMoEConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: XMoEConfig, layer_idx: int) -> None:
        super().__init__()
        is_moe = layer_idx in config.moe_layer_indices
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = MoELayer(config) if is_moe else FeedForward(config)
        self.ffn_bias = nn.Parameter(torch.zeros(config.d_model)) if is_moe and config.moe_output_bias else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BLD, mask_B1LS, real_BL, cache):
        x_BLD = x_BLD + self.drop(self.attn(self.ln_1(x_BLD), mask_B1LS, cache))
        if not isinstance(self.ffn, MoELayer):
            return x_BLD + self.drop(self.ffn(self.ln_2(x_BLD))), None
        y_BLD, routing = self.ffn(self.ln_2(x_BLD), real_BL)
        if self.ffn_bias is not None:
            y_BLD = y_BLD + self.ffn_bias
        return x_BLD + self.drop(y_BLD), routing


class GPT(nn.Module):
    def __init__(self, config: XMoEConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)


class XMoEPreTrainedModel(PreTrainedModel):
    config_class = XMoEConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.wte.weight"}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init for the modules a folder has no weights for: N(0, init_std), biases 0."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.lm_head = value


class XMoEForCausalLM(XMoEPreTrainedModel, WindowedGenerationMixin):
    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.transformer = GPT(config)
        self.post_init()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                output_router_logits: bool | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("XMoEForCausalLM needs input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        check_cache(cache)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:  # training keeps no keys and values
            cache = DynamicCache(config=self.config)
        use_cache = use_cache and cache is not None
        past = cache.get_seq_length() if cache is not None else 0
        pos_BL, mask_B1LS, real_BL = positions_and_masks(input_ids, attention_mask, position_ids, past)
        if int(pos_BL.max()) >= self.config.block_size:
            raise ValueError(f"position {int(pos_BL.max())} is past the model's block_size={self.config.block_size}; "
                             f"give at most block_size tokens (generate() slides the window itself)")
        model = self.transformer
        x_BLD = model.drop(model.wte(input_ids) + model.wpe(pos_BL))
        routings = []
        for block in model.blocks:
            x_BLD, routing = block(x_BLD, mask_B1LS, real_BL, cache if use_cache else None)
            if routing is not None:
                routings.append(routing)
        logits_BLV = model.lm_head(model.ln_f(x_BLD))
        aux_loss = sum((r.balancing_loss() for r in routings), torch.zeros((), device=logits_BLV.device))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits_BLV, labels) + self.config.router_aux_loss_coef * aux_loss
            if self.config.router_entropy_loss_coef:
                loss = loss + self.config.router_entropy_loss_coef * sum(r.entropy() for r in routings)
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits_BLV,
            router_logits=tuple(r.logits_TE for r in routings) if want_logits else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )
