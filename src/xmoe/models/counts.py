"""Parameters and forward FLOPs per token of the models a config builds, counted from the
config alone: no model is built and no torch is imported, so ``xmoe presets`` lists the
200M-parameter presets at once. The tests check every count against a built model.

Conventions (as Kaplan et al. 2020, and nanoGPT's ``estimate_mfu``): 2 FLOPs per multiply-add;
biases, norms and activations left out of the FLOPs; tied or shared embeddings counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmoe.moe.config import MoEConfig

from .config import GPTConfig, Seq2SeqConfig


def moe_params(moe: MoEConfig) -> int:
    """One MoE layer: the router [E, D] and E experts (num_matrices weights, optional biases)."""
    E, D, F = moe.num_experts, moe.model_dim, moe.expert_dim
    weights = E * D * F * moe.num_matrices
    biases = E * (F * (moe.num_matrices - 1) + D) if moe.expert_bias else 0
    return E * D + weights + biases


def _attention_params(d_model: int) -> int:
    """Q, K, V and output projections, with biases (self- or cross-attention alike)."""
    return 4 * d_model * d_model + 4 * d_model


def _ffn_params(d_model: int, d_ff: int) -> int:
    """The dense FFN D -> F -> D, with biases."""
    return 2 * d_model * d_ff + d_ff + d_model


def gpt_params(cfg: GPTConfig, *, non_embedding: bool = False) -> int:
    """Parameters of ``GPT(cfg)``. ``non_embedding=True`` leaves out the position embeddings (as
    nanoGPT reports; the token embeddings are also the output layer, so they stay)."""
    D = cfg.d_model
    num_moe = len(cfg.moe_layer_indices)
    total = cfg.vocab_size * D + cfg.block_size * D + 2 * D  # wte (= lm_head), wpe, ln_f
    total += cfg.n_layer * (2 * 2 * D + _attention_params(D))  # two LayerNorms, attention
    total += (cfg.n_layer - num_moe) * _ffn_params(D, cfg.d_ff)
    if cfg.moe is not None:
        total += num_moe * (moe_params(cfg.moe) + (D if cfg.moe_output_bias else 0))
    return total - (cfg.block_size * D if non_embedding else 0)


def seq2seq_params(cfg: Seq2SeqConfig) -> int:
    """Parameters of ``Seq2Seq(cfg)``: one embedding shared by encoder, decoder and output layer;
    sinusoidal positions (no parameters); an encoder layer holds self-attention, an FFN and two
    LayerNorms, a decoder layer adds cross-attention and a third; pre-LN adds a final LayerNorm
    per stack."""
    D = cfg.d_model
    num_moe = len(cfg.enc_moe_layer_indices) + len(cfg.dec_moe_layer_indices)
    num_dense = cfg.n_enc_layer + cfg.n_dec_layer - num_moe
    total = cfg.vocab_size * D
    total += cfg.n_enc_layer * (2 * 2 * D + _attention_params(D))
    total += cfg.n_dec_layer * (3 * 2 * D + 2 * _attention_params(D))
    total += num_dense * _ffn_params(D, cfg.d_ff) + (num_moe * moe_params(cfg.moe) if num_moe else 0)
    return total + (2 * 2 * D if cfg.norm == "pre" else 0)


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token of a GPT, by part. Attention scores assume the full context
    (``block_size`` keys per query, the Kaplan et al. 2020 convention). MoE experts are counted
    at the top-k-equivalent budget, ``moe.top_k`` experts per token in every MoE layer: for XMoE
    presets top_k is set to the parameter-matched top-k (one dense FFN's FLOPs), the budget the
    threshold router undercuts."""

    attention: int  # QKV and output projections, QK^T and AV
    dense_ffn: int  # the dense FFN layers
    router: int  # MoE gates
    experts: int  # MoE experts at the top-k-equivalent budget
    lm_head: int  # output logits

    @property
    def total(self) -> int:
        return self.attention + self.dense_ffn + self.router + self.experts + self.lm_head


def flops_breakdown(cfg: GPTConfig, *, context: int | None = None) -> FlopsPerToken:
    """Activated forward FLOPs per token of ``cfg``, by part; ``context`` defaults to block_size."""
    D, ctx = cfg.d_model, cfg.block_size if context is None else context
    num_moe = len(cfg.moe_layer_indices)
    moe = cfg.moe
    return FlopsPerToken(
        attention=cfg.n_layer * (2 * 4 * D * D + 2 * 2 * ctx * D),
        dense_ffn=(cfg.n_layer - num_moe) * 2 * 2 * D * cfg.d_ff,
        router=num_moe * 2 * D * moe.num_experts if moe is not None else 0,
        experts=num_moe * min(moe.top_k, moe.num_experts) * moe.flops_per_pair if moe is not None else 0,
        lm_head=2 * D * cfg.vocab_size,
    )


def flops_per_token(cfg: GPTConfig, *, context: int | None = None) -> int:
    """Total activated forward FLOPs per token (see FlopsPerToken for what is counted)."""
    return flops_breakdown(cfg, context=context).total


def moe_flops_budget(cfg: Seq2SeqConfig) -> float:
    """Expert FLOPs per token summed over the MoE layers for the top-k model of equal
    parameters (``moe.top_k`` experts per token per layer; for XMoE presets top_k is the
    parameter-matched baseline's k)."""
    if cfg.moe is None:
        return 0.0
    num_moe = len(cfg.enc_moe_layer_indices) + len(cfg.dec_moe_layer_indices)
    return float(num_moe * min(cfg.moe.top_k, cfg.moe.num_experts) * cfg.moe.flops_per_pair)
