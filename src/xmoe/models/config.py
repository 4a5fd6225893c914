"""The model configs, GPTConfig and Seq2SeqConfig: keyword-only dataclasses, every field checked
when the config is built. They import no torch, so that naming, listing and counting models
(``xmoe presets``, xmoe.models.counts) starts in a fraction of a second; the models that
build them are xmoe.models.gpt and xmoe.models.seq2seq.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmoe.errors import UsageError, check_counts
from xmoe.moe.config import MoEConfig


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """A GPT-2-style decoder. ``moe`` replaces the FFN of layers i (1-based) with
    ``i % moe_every == 0``: moe_every=2 gives layers 2, 4, ..., as in the paper. ``moe=None`` is
    the dense model (``moe_every`` is then unused). ``moe.model_dim`` must equal ``d_model``."""

    vocab_size: int
    block_size: int  # context length: the most positions the model sees at once
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int  # hidden width of the dense FFNs
    dropout: float = 0.0  # embeddings, attention probabilities, residual branches
    moe_every: int = 2
    moe: MoEConfig | None = None
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5
    # MoE blocks add one shared output bias [D] after the experts, whatever experts are engaged:
    # a dense FFN converted to experts keeps its down-projection bias here, added once, so the
    # converted block equals the dense one when every expert is engaged (xmoe.conversion).
    moe_output_bias: bool = False

    def __post_init__(self) -> None:
        check_counts("GPTConfig", **{name: getattr(self, name) for name in (
            "vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff", "moe_every")})
        _check_width_and_moe(self)
        for name in ("init_std", "layer_norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise UsageError(f"GPTConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.moe_output_bias, bool):
            raise UsageError(f"GPTConfig.moe_output_bias must be True or False, got {self.moe_output_bias!r}")
        if self.moe is not None and self.moe_every > self.n_layer:
            raise UsageError(
                f"GPTConfig.moe_every={self.moe_every} > n_layer={self.n_layer} places no MoE layer; "
                f"use moe_every <= n_layer, or moe=None for a dense model"
            )

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """0-based indices of the MoE blocks: layer i+1 (1-based) when (i+1) % moe_every == 0."""
        if self.moe is None:
            return ()
        return tuple(i for i in range(self.n_layer) if (i + 1) % self.moe_every == 0)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


NORMS = ("post", "pre")


@dataclass(frozen=True, kw_only=True)
class Seq2SeqConfig:
    """An encoder-decoder. ``moe`` replaces the FFN of encoder layer i (1-based) when
    ``i % enc_moe_every == 0`` and of decoder layer i when ``dec_moe_every`` and
    ``i % dec_moe_every == 0`` (0: no decoder MoE). ``moe=None`` is the dense model.
    Token ids ``pad_id``/``bos_id``/``eos_id`` are the tokenizer's; ``max_len`` bounds the
    positions of a source or target sequence (special tokens included)."""

    vocab_size: int
    max_len: int = 256
    n_enc_layer: int = 6
    n_dec_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    d_ff: int = 2048
    dropout: float = 0.1  # embeddings, attention probabilities, residual branches
    norm: str = "post"  # "post" (the paper, Vaswani et al.) or "pre"
    enc_moe_every: int = 2
    dec_moe_every: int = 0
    moe: MoEConfig | None = None
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_counts("Seq2SeqConfig", **{name: getattr(self, name) for name in (
            "vocab_size", "max_len", "n_enc_layer", "n_dec_layer", "n_head", "d_model", "d_ff")})
        check_counts("Seq2SeqConfig", minimum=0, **{name: getattr(self, name) for name in (
            "enc_moe_every", "dec_moe_every", "pad_id", "bos_id", "eos_id")})
        _check_width_and_moe(self)
        if self.norm not in NORMS:
            raise UsageError(f"Seq2SeqConfig.norm={self.norm!r} is not one of {', '.join(NORMS)}")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        if len(set(ids)) != 3 or max(ids) >= self.vocab_size:
            raise UsageError(
                f"Seq2SeqConfig pad_id, bos_id, eos_id = {ids} must be distinct ids below "
                f"vocab_size={self.vocab_size}"
            )
        if self.moe is not None and not self.enc_moe_layer_indices and not self.dec_moe_layer_indices:
            raise UsageError(
                f"Seq2SeqConfig places no MoE layer (enc_moe_every={self.enc_moe_every}, "
                f"dec_moe_every={self.dec_moe_every}); use moe=None for a dense model"
            )

    @property
    def enc_moe_layer_indices(self) -> tuple[int, ...]:
        """0-based indices of the encoder's MoE layers."""
        return _moe_layer_indices(self.n_enc_layer, self.enc_moe_every if self.moe is not None else 0)

    @property
    def dec_moe_layer_indices(self) -> tuple[int, ...]:
        """0-based indices of the decoder's MoE layers."""
        return _moe_layer_indices(self.n_dec_layer, self.dec_moe_every if self.moe is not None else 0)


def _check_width_and_moe(cfg: GPTConfig | Seq2SeqConfig) -> None:
    """What both models require: heads that divide the width, a dropout probability, and MoE
    layers (if any) of the model's width."""
    owner = type(cfg).__name__
    if cfg.d_model % cfg.n_head:
        raise UsageError(f"{owner}.d_model={cfg.d_model} is not divisible by {owner}.n_head={cfg.n_head}; pick "
                         f"n_head dividing d_model (head dim = d_model / n_head)")
    if not (isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0):
        raise UsageError(f"{owner}.dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.moe is not None and not isinstance(cfg.moe, MoEConfig):
        raise UsageError(f"{owner}.moe must be an xmoe.moe.MoEConfig or None (dense), got {type(cfg.moe).__name__}")
    if cfg.moe is not None and cfg.moe.model_dim != cfg.d_model:
        raise UsageError(f"{owner}.moe.model_dim={cfg.moe.model_dim} differs from {owner}.d_model={cfg.d_model}; "
                         f"build the MoEConfig with model_dim=d_model")


def _moe_layer_indices(num_layers: int, every: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers) if every and (i + 1) % every == 0)
