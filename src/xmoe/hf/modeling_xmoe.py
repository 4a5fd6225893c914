"""XMoEForCausalLM: xmoe's GPT (xmoe.models.gpt) as a transformers causal LM, so that
``AutoModelForCausalLM.from_pretrained``, ``generate()``, the Trainer and PEFT work on it.

The model holds an unchanged ``xmoe.models.gpt.GPT`` (its blocks, its ``MoELayer``s, its
weights) and runs GPT.forward, so its logits are xmoe's own. What this file adds is the
transformers contract:

- the KV cache: transformers passes a ``Cache`` (``cache=`` from 5.24 on, ``past_key_values=``
  before); xmoe's attention writes into it through ``_CacheView``;
- ``MoeCausalLMOutputWithPast``: ``aux_loss`` (the sum over MoE layers of the unscaled
  balancing loss), ``router_logits`` when asked (``output_router_logits``), and a ``loss`` from
  ``labels`` (shifted inside, as transformers does) that is ``CE + router_aux_loss_coef *
  aux_loss`` (0.01, the paper's recipe), so the Trainer trains what ``xmoe train`` trains.
  ``routing_stats`` carries xmoe's RoutingStats, one per MoE layer;
- the threshold dial: ``config.moe_threshold`` is the t the model is built with, and
  ``xmoe.moe.set_threshold(model, t)`` changes it on the loaded model (saved with it).

This file is copied beside the weights by ``save_pretrained`` (``trust_remote_code`` loading), so
it imports xmoe only by absolute imports, and its own config by a relative one.

Shape legend: B batch, L sequence length, T tokens (B * L), E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from xmoe.models.gpt import GPT, IGNORE_INDEX
from xmoe.moe import Dial, MoELayer, RoutingStats

from .configuration_xmoe import XMoEConfig

# The output's cache field: "cache" from transformers 5.24 on, "past_key_values" before.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class XMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output, plus xmoe's routing statistics (one RoutingStats per MoE layer)."""

    routing_stats: tuple[RoutingStats, ...] | None = None


class _CacheView:
    """A transformers Cache seen through the interface xmoe's attention uses (xmoe.models.layers
    .KVCache): ``position``, ``update(layer, k, v)`` returning every key and value so far, and
    ``advance(L)`` (transformers' caches count positions themselves)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.position = cache.get_seq_length()

    def update(self, layer: int, k_BHLA: Tensor, v_BHLA: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k_BHLA, v_BHLA, layer)

    def advance(self, num_positions: int) -> None:
        self.position += num_positions


class XMoEPreTrainedModel(PreTrainedModel):
    config_class = XMoEConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' convention: initialise ``module``'s own parameters, as xmoe's GPT does
        when it is built (xmoe.models.layers.init_gpt2_, without the depth scaling of residual
        projections): Linear and Embedding weights ~ N(0, init_std), biases 0, LayerNorm (1, 0),
        routers and experts as their MoEConfig says. from_pretrained calls it for the modules a
        folder has no weights for (a config.json that disagrees with its weights), which would
        otherwise keep uninitialised memory."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) or hasattr(module, "reset_parameters") and module is not self:
            module.reset_parameters()
        elif isinstance(module, Dial):  # its unsaved per-step counts; a trained t comes with the weights
            module.reset_counts()


class XMoEForCausalLM(XMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.wte.weight"}
    accepts_loss_kwargs = False  # the loss is a mean over the batch's targets, like xmoe train's

    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.transformer = GPT(config.to_gpt_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.lm_head

    def moe_layers(self) -> list[MoELayer]:
        return self.transformer.moe_layers()

    @property
    def moe_threshold(self) -> float | None:
        """The threshold the MoE layers route with now (None when they have none)."""
        thresholds = {layer.threshold for layer in self.moe_layers() if layer.cfg.router == "threshold"}
        return thresholds.pop() if len(thresholds) == 1 else self.config.moe_threshold

    def save_pretrained(self, *args, **kwargs):
        # The live t goes into config.json: xmoe.moe.set_threshold(model, t) changes the layers only.
        if self.config.moe is not None:
            self.config.moe_threshold = self.moe_threshold
        return super().save_pretrained(*args, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> XMoECausalLMOutput:
        """Logits for ``input_ids`` [B, L]; with ``labels`` [B, L] (-100 skipped), the loss of
        predicting ``labels[:, 1:]`` from the positions before, plus the weighted balancing loss.

        ``cache`` / ``past_key_values`` (either spelling): a transformers Cache holding the
        tokens before ``input_ids``; positions continue after them. ``attention_mask`` may only
        mark right padding (absolute positions make left padding wrong), and only without a cache.
        """
        if input_ids is None:
            raise ValueError("XMoEForCausalLM needs input_ids (inputs_embeds are not supported)")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("give the KV cache once, as cache= or past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"XMoEForCausalLM does not return {flag.removeprefix('output_')}; call it with {flag}=False")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            cache = None  # training mode routes with capacity: incremental decoding would not match
        elif use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        view = _CacheView(cache) if cache is not None else None
        _check_attention_mask(attention_mask, cached=view is not None and view.position > 0)

        targets_BL = None
        if labels is not None:  # position i predicts labels[i + 1]; the last position nothing
            targets_BL = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        router_logits: list[Tensor] = []
        hooks = [layer.register_forward_hook(_record_router_logits(router_logits)) for layer in self.moe_layers()] \
            if want_logits else []
        try:
            out = self.transformer(input_ids, targets=targets_BL, cache=view)
        finally:
            for hook in hooks:
                hook.remove()

        loss = None
        if out.loss is not None:
            loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
            if self.config.router_entropy_loss_coef:  # router sharpening, beyond the paper (off by default)
                loss = loss + self.config.router_entropy_loss_coef * out.entropy_loss
        return XMoECausalLMOutput(
            loss=loss,
            aux_loss=out.aux_loss,
            logits=out.logits_BLV,
            router_logits=tuple(router_logits) if want_logits else None,
            routing_stats=out.stats,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


def _record_router_logits(into: list[Tensor]):
    """A forward hook on a MoELayer appending its router logits [T, E] for the hook's input."""

    def hook(layer: MoELayer, inputs: tuple, _output) -> None:
        into.append(layer.route(inputs[0]).logits_TE)

    return hook


def _check_attention_mask(mask_BS: Tensor | None, *, cached: bool) -> None:
    """Padding is allowed on the right only (it is never attended by an earlier real token), and
    not while decoding with a cache."""
    if mask_BS is None or bool(mask_BS.all()):
        return
    if cached:
        raise ValueError(
            "XMoEForCausalLM got a padded attention_mask while decoding with a cache; xmoe's positions are "
            "absolute, so generate() needs unpadded prompts: generate one prompt (or equal-length prompts) at a time"
        )
    if not bool((mask_BS[:, 1:] <= mask_BS[:, :-1]).all()):
        raise ValueError(
            "XMoEForCausalLM supports right padding only (attention_mask of 1s then 0s per row); xmoe's positions "
            "are absolute, so left padding would shift them: pad on the right (tokenizer.padding_side = 'right')"
        )
