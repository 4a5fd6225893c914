"""XMoEForCausalLM: xmoe's GPT (xmoe.models.gpt) as a transformers causal LM, so that
``AutoModelForCausalLM.from_pretrained``, ``generate()``, the Trainer and PEFT work on it with
xmoe's own layers (its backends, its routing statistics, its compute-budget state).

The model holds an unchanged ``xmoe.models.gpt.GPT`` and runs GPT.forward, so its logits are
xmoe's own. The transformers contract around it (padding and positions, the generation window
past ``block_size``, the embeddings) is the portable model's (xmoe.hf.standalone.modeling_xmoe,
which exported folders carry); what this file adds:

- the KV cache: transformers passes a ``Cache`` (``cache=`` from 5.24 on, ``past_key_values=``
  before); xmoe's attention writes into it through ``_CacheView``;
- ``MoeCausalLMOutputWithPast``: ``aux_loss`` (the sum over MoE layers of the unscaled
  balancing loss, over real tokens), ``router_logits`` when asked, a ``loss`` from ``labels``
  that is ``CE + router_aux_loss_coef * aux_loss`` (0.01, the paper's recipe), and
  ``routing_stats``, xmoe's RoutingStats, one per MoE layer;
- the dial (``DialMixin``): ``config.moe_threshold`` is read at every call, and
  ``xmoe.moe.set_threshold(model, t)`` works too; whichever was set last routes, and
  ``save_pretrained`` writes it;
- ``save_pretrained`` writes the portable modeling code beside the weights, not this file, so a
  saved folder loads with ``trust_remote_code=True`` where xmoe is not installed.

Shape legend: B batch, L sequence length, S cached + new positions, E experts, V vocabulary.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

import xmoe
from xmoe.models.gpt import GPT, IGNORE_INDEX
from xmoe.moe import Dial, MoELayer, RoutingStats, set_threshold

from .configuration_xmoe import XMoEConfig
from .standalone import FOLDER as PORTABLE_FOLDER
from .standalone.modeling_xmoe import (
    CACHE_FIELD, WindowedGenerationMixin, XMoEPreTrainedModel, check_cache, positions_and_masks,
)


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


class DialMixin:
    """One dial for an xmoe model loaded in transformers: ``config.moe_threshold``.

    xmoe's layers hold their t themselves (``xmoe.moe.set_threshold`` turns it), so the config
    and the layers are kept in step: a config edit is pushed into the layers at the next call
    (or ``apply_dial()``), a ``set_threshold`` is written back into the config by
    ``save_pretrained``. ``moe_threshold=None`` leaves each layer's own t (a compute budget's
    trained t, loaded with the weights)."""

    def apply_dial(self) -> None:
        """Route every threshold layer at ``config.moe_threshold`` if it was edited since last applied."""
        t = self.config.moe_threshold
        if t is not None and t != getattr(self, "_applied_threshold", None):
            set_threshold(self, t)
        self._applied_threshold = t

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in module order: xmoe's GPT blocks', or the FFNs a conversion replaced."""
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    @property
    def moe_threshold(self) -> float | None:
        """The t every threshold layer routes with now (None when they differ or there are none)."""
        thresholds = {layer.threshold for layer in self.moe_layers() if layer.router.kind == "threshold"}
        return thresholds.pop() if len(thresholds) == 1 else None

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        # The weights were loaded after __init__: a trained t in them gives way to a moe_threshold.
        model._applied_threshold = None
        model.apply_dial()
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """transformers' save_pretrained, with the dial as it routes now, the xmoe version, and the
        portable modeling code (``auto_map``) instead of this file."""
        self.apply_dial()  # a config edit not yet applied wins over the layers' t
        if (mismatch := capacity_mismatch(self)) is not None:  # a warning: the Trainer saves checkpoints here
            warnings.warn(mismatch, stacklevel=2)
        if self.moe_threshold is not None:  # None: no threshold layer, or a budget's t per layer
            self.config.moe_threshold = self._applied_threshold = self.moe_threshold
        self.config.xmoe_version = xmoe.__version__
        kind = "modeling_xmoe_converted" if self.config.model_type == "xmoe_converted" else "modeling_xmoe"
        self.config.auto_map = {"AutoConfig": f"configuration_xmoe.{type(self.config).__name__}",
                                "AutoModelForCausalLM": f"{kind}.{type(self).__name__}"}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        header = f"# Written by xmoe {xmoe.__version__}; needs only torch and transformers.\n"
        for name in ("configuration_xmoe.py", "xmoe_layer.py", f"{kind}.py"):  # the portable modules
            (Path(save_directory) / name).write_text(header + (PORTABLE_FOLDER / name).read_text())
        return out


def capacity_mismatch(model: DialMixin) -> str | None:
    """What is wrong with saving ``model`` as a folder, if its MoE layers evaluate with capacity:
    a folder routes with its portable code, which is dropless (as cached decoding must be: a call
    of one new token per sequence would fill an expert's slots differently from a full forward),
    so it would compute other outputs. None when nothing is."""
    factors = {layer.router.dial.eval_capacity_factor for layer in model.moe_layers()}
    factors = (factors | {(model.config.moe or {}).get("eval_capacity_factor")}) - {None}
    if not factors:
        return None
    return (f"this model evaluates with capacity (eval_capacity_factor={factors.pop()}), and the modeling code a "
            f"saved folder carries routes dropless, so the folder computes other outputs than xmoe does; export "
            f"it to route dropless: `xmoe export-hf --dropless` (Python: xmoe.hf.export_model(..., dropless=True)), "
            f"or build the model with eval_capacity_factor=None")


class XMoEForCausalLM(DialMixin, XMoEPreTrainedModel, WindowedGenerationMixin):
    config_class = XMoEConfig
    accepts_loss_kwargs = False  # the loss is a mean over the batch's targets, like xmoe train's

    def __init__(self, config: XMoEConfig) -> None:
        super().__init__(config)
        self.transformer = GPT(config.to_gpt_config())
        self._applied_threshold = config.moe_threshold
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' convention: initialise ``module``'s own parameters, as xmoe's GPT does
        when it is built (xmoe.models.layers.init_gpt2_, without the depth scaling of residual
        projections): Linear and Embedding weights ~ N(0, init_std), biases 0, LayerNorm (1, 0),
        routers and experts as their MoEConfig says. from_pretrained calls it for the modules a
        folder has no weights for (a config.json that disagrees with its weights), which would
        otherwise keep uninitialised memory."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            super()._init_weights(module)
        elif isinstance(module, nn.LayerNorm) or hasattr(module, "reset_parameters") and module is not self:
            module.reset_parameters()
        elif isinstance(module, Dial):  # its unsaved per-step counts; a trained t comes with the weights
            module.reset_counts()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
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
        tokens before ``input_ids``. ``attention_mask`` [B, S] (1 real, 0 padding; left or
        right): pad tokens are attended by nobody and routed to no expert, and without
        ``position_ids`` a token's position counts the real tokens before it.
        """
        if input_ids is None:
            raise ValueError("XMoEForCausalLM needs input_ids (inputs_embeds are not supported)")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("give the KV cache once, as cache= or past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        check_cache(cache)
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"XMoEForCausalLM does not return {flag.removeprefix('output_')}; call it with {flag}=False")
        self.apply_dial()
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            cache = None  # training mode routes with capacity: incremental decoding would not match
        elif use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        view = _CacheView(cache) if cache is not None else None
        pos_BL, mask_B1LS, real_BL = positions_and_masks(input_ids, attention_mask, position_ids,
                                                          view.position if view is not None else 0)

        targets_BL = None
        if labels is not None:  # position i predicts labels[i + 1]; the last position nothing
            targets_BL = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        out = self.transformer(input_ids, targets=targets_BL, cache=view, positions_BL=pos_BL, attn_mask=mask_B1LS,
                               token_mask_BL=real_BL)
        loss = None
        if out.loss is not None:
            loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
            if self.config.router_entropy_loss_coef:  # router sharpening, beyond the paper (off by default)
                loss = loss + self.config.router_entropy_loss_coef * out.entropy_loss
        return XMoECausalLMOutput(
            loss=loss,
            aux_loss=out.aux_loss,
            logits=out.logits_BLV,
            router_logits=tuple(o.decision.logits_TE for o in out.moe_outputs) if want_logits else None,
            routing_stats=out.stats,
            **{CACHE_FIELD: cache if use_cache else None},
        )
