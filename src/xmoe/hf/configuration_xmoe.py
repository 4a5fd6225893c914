"""XMoEConfig: the transformers config of an xmoe GPT (xmoe.models.gpt.GPTConfig as a
``PretrainedConfig``), so that ``AutoConfig`` reads and writes it.

The fields are GPTConfig's, plus the MoE layer's fields as a plain dict (``moe``, None for a
dense model) and ``moe_threshold``: the threshold t the loaded model routes with (the XMoE
compute dial, Yang et al. 2024, arXiv 2403.18926, Sec. 3), saved and loaded with the folder.
``router_aux_loss_coef`` (0.01, the paper's coefficient) weighs the balancing loss that a loss
computed from ``labels`` includes; ``router_entropy_loss_coef`` (0, off) adds the mean router
entropy, the router-sharpening option of `xmoe train` (train.entropy_loss_coef).

This file is copied beside the weights by ``save_pretrained`` (``trust_remote_code`` loading), so
it imports xmoe only by absolute imports: a user of the folder needs xmoe installed.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from xmoe.models.gpt import GPTConfig
from xmoe.moe import MoEConfig


class XMoEConfig(PretrainedConfig):
    """An xmoe GPT: pre-LN blocks, learned positions, tied embeddings, MoE FFNs in every
    ``moe_every``-th layer (see xmoe.models.gpt.GPTConfig for each field)."""

    model_type = "xmoe"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
        "intermediate_size": "d_ff",
    }

    def __init__(
        self,
        vocab_size: int = 512,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 2,
        d_model: int = 64,
        d_ff: int = 256,
        dropout: float = 0.0,
        moe_every: int = 2,
        moe: dict | None = None,
        moe_output_bias: bool = False,
        moe_threshold: float | None = None,
        layer_norm_eps: float = 1e-5,
        init_std: float = 0.02,
        router_aux_loss_coef: float = 0.01,
        router_entropy_loss_coef: float = 0.0,
        output_router_logits: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.d_ff = d_ff
        self.dropout = dropout
        self.moe_every = moe_every
        self.moe = dict(moe) if moe is not None else None
        self.moe_output_bias = moe_output_bias
        if moe_threshold is None and self.moe is not None:
            moe_threshold = self.moe.get("threshold")
        self.moe_threshold = moe_threshold
        self.layer_norm_eps = layer_norm_eps
        self.init_std = init_std
        self.router_aux_loss_coef = router_aux_loss_coef
        if not 0 <= router_entropy_loss_coef < float("inf"):
            raise ValueError(f"XMoEConfig.router_entropy_loss_coef must be a finite number >= 0 (0: the paper's "
                             f"recipe), got {router_entropy_loss_coef!r}")
        self.router_entropy_loss_coef = router_entropy_loss_coef
        self.output_router_logits = output_router_logits
        self.use_cache = use_cache
        if not tie_word_embeddings:
            raise ValueError("XMoEConfig.tie_word_embeddings must be True: xmoe's GPT ties its input and output embeddings")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.to_gpt_config()  # every field checked now, with GPTConfig's and MoEConfig's messages

    def to_gpt_config(self) -> GPTConfig:
        """The GPTConfig this config describes, its MoE layers routing at ``moe_threshold``."""
        moe = None
        if self.moe is not None:
            fields = dict(self.moe)
            if self.moe_threshold is not None:
                fields["threshold"] = self.moe_threshold
            moe = MoEConfig(**fields)
        return GPTConfig(
            vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
            d_model=self.d_model, d_ff=self.d_ff, dropout=self.dropout, moe_every=self.moe_every, moe=moe,
            init_std=self.init_std, layer_norm_eps=self.layer_norm_eps, moe_output_bias=self.moe_output_bias,
        )

    @classmethod
    def from_gpt_config(cls, cfg: GPTConfig, **kwargs) -> XMoEConfig:
        """The config of an xmoe GPT built from ``cfg`` (``kwargs``: e.g. bos/eos token ids)."""
        return cls(
            vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
            d_model=cfg.d_model, d_ff=cfg.d_ff, dropout=cfg.dropout, moe_every=cfg.moe_every,
            moe=dataclasses.asdict(cfg.moe) if cfg.moe is not None else None, moe_output_bias=cfg.moe_output_bias,
            layer_norm_eps=cfg.layer_norm_eps, init_std=cfg.init_std, **kwargs,
        )
