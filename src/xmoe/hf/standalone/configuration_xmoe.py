"""The configs of XMoE models on the Hugging Face Hub, self-contained (transformers only).

XMoE (Yang et al., 2024, "XMoE: Sparse Models with Fine-grained and Adaptive Expert Selection",
arXiv 2403.18926): many small experts behind a threshold router. Each token takes the smallest
set of its most probable experts whose probabilities add up to the threshold t, so t is a
compute dial: lower t, fewer experts per token.

``XMoEConfig`` describes an XMoE GPT (``xmoe train``), ``XMoEConvertedConfig`` a Hugging Face
GPT-2 / LLaMA-style model whose FFNs were split into experts (``xmoe convert``). Both carry:

- ``moe``: the MoE layers' settings (a dict: num_experts, expert_dim, router, activation, ...);
- ``moe_threshold``: the dial, the t every threshold-routed layer routes with. The model reads
  it at every call, so ``model.config.moe_threshold = 0.7`` takes effect at once and
  ``save_pretrained`` keeps it. ``None`` means "as trained": each layer routes with the t its
  compute-budget controller reached in training (saved in the weights);
- the MoE fields other tools read: ``num_experts``, ``num_experts_per_tok`` (the top-k
  reference: k of a top-k router, the FLOPs budget a threshold router is compared with),
  ``router_aux_loss_coef``, ``output_router_logits``;
- ``xmoe_version``: the xmoe release that wrote the folder.

This file is copied into exported folders; it imports nothing but transformers.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


def check_threshold(value) -> None:
    """t must be a number in (0, 1]: 1 takes every expert; None is "as trained"."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"moe_threshold must be a number in (0, 1] (1 takes every expert) or None (each layer's "
                         f"trained t), got {value!r}")


class _MoEFields:
    """The MoE part both configs share: ``moe``, ``moe_threshold`` and the standard MoE fields
    derived from ``moe`` (given values must agree with it: one source of truth)."""

    def _set_moe(self, moe: dict | None, moe_threshold: float | None, kwargs: dict) -> None:
        self.moe = dict(moe) if moe is not None else None
        if moe_threshold is None and self.moe is not None and self.moe.get("target_experts") is None:
            moe_threshold = self.moe.get("threshold")  # a fixed t; a budgeted model's is in its weights
        check_threshold(moe_threshold)
        self.moe_threshold = moe_threshold
        derived = {"num_experts": None, "num_experts_per_tok": None}
        if self.moe is not None:
            derived = {"num_experts": self.moe["num_experts"], "num_experts_per_tok": self.moe.get("top_k", 2)}
        for name, value in derived.items():
            given = kwargs.pop(name, None)
            if given is not None and given != value:
                raise ValueError(f"{name}={given} disagrees with moe={self.moe}; {name} is derived from moe, "
                                 f"leave it out")
            setattr(self, name, value)


class XMoEConfig(_MoEFields, PretrainedConfig):
    """An XMoE GPT: GPT-2-style pre-LN blocks, learned positions, tied embeddings, an MoE FFN in
    every ``moe_every``-th layer (``moe=None``: a dense model)."""

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
        xmoe_version: str | None = None,
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
        self._set_moe(moe, moe_threshold, kwargs)
        self.moe_output_bias = moe_output_bias
        self.layer_norm_eps = layer_norm_eps
        self.init_std = init_std
        self.router_aux_loss_coef = router_aux_loss_coef
        if not 0 <= router_entropy_loss_coef < float("inf"):
            raise ValueError(f"XMoEConfig.router_entropy_loss_coef must be a finite number >= 0 (0: the paper's "
                             f"recipe), got {router_entropy_loss_coef!r}")
        self.router_entropy_loss_coef = router_entropy_loss_coef
        self.output_router_logits = output_router_logits
        self.use_cache = use_cache
        self.xmoe_version = xmoe_version
        if not tie_word_embeddings:
            raise ValueError("XMoEConfig.tie_word_embeddings must be True: XMoE's GPT ties its input and output embeddings")
        if d_model % n_head:
            raise ValueError(f"XMoEConfig.d_model={d_model} is not divisible by n_head={n_head}; pick n_head "
                             f"dividing d_model")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """0-based indices of the MoE blocks: layer i+1 (1-based) when (i+1) % moe_every == 0."""
        if self.moe is None:
            return ()
        return tuple(i for i in range(self.n_layer) if (i + 1) % self.moe_every == 0)


class XMoEConvertedConfig(_MoEFields, PretrainedConfig):
    """A Hugging Face model (``base``: its config, model_type included) whose FFNs named in
    ``converted_modules`` are MoE layers (``moe``), each followed by the FFN's own output bias
    when ``moe_output_bias``."""

    model_type = "xmoe_converted"

    def __init__(self, base: dict | None = None, converted_modules: list[str] | None = None, moe: dict | None = None,
                 moe_output_bias: bool = False, moe_threshold: float | None = None, router_aux_loss_coef: float = 0.0,
                 output_router_logits: bool = False, xmoe_version: str | None = None, **kwargs) -> None:
        self.base = dict(base or {"model_type": "gpt2"})
        self.converted_modules = list(converted_modules or [])
        self._set_moe(moe, moe_threshold, kwargs)
        self.moe_output_bias = moe_output_bias
        self.router_aux_loss_coef = router_aux_loss_coef  # the base model's loss has no balancing term
        self.output_router_logits = output_router_logits  # not returned: the base model's output has no field
        self.xmoe_version = xmoe_version
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        """The original model's config."""
        fields = dict(self.base)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        # Generation sizes its KV cache from the text config: the original model's.
        return self.base_config().get_text_config(*args, **kwargs)
