"""The dense models against implementations written elsewhere, with the same weights copied in.

GPT: the dense preset against Hugging Face's ``GPT2LMHeadModel`` (a tiny config built here,
nothing downloaded). Two layouts differ and are bridged, not hidden: GPT-2's ``Conv1D`` stores
weights as [in, out] (ours, ``nn.Linear``, as [out, in]: copied transposed), and GPT-2's
released models use the tanh approximation of GeLU (``gelu_new``) where xmoe's FFN uses the exact
erf GeLU (``F.gelu``): the reference is built with ``activation_function="gelu"``, the exact one.

Encoder-decoder: the dense translation preset against ``torch.nn.TransformerEncoder`` /
``TransformerDecoder`` (post-LN as Vaswani et al., and pre-LN with a final LayerNorm per stack),
with the embeddings (x sqrt(D)), the sinusoidal positions and the output layer (the shared
embeddings) written out below. ``nn.Transformer`` itself always adds a final LayerNorm to each
stack, which post-LN does not have, so the two stacks are used directly.

Everything in fp32; the logits agree to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from xmoe.models import GPT
from xmoe.models.seq2seq import Seq2Seq
from xmoe.presets import get_mt_preset, get_preset

transformers = pytest.importorskip("transformers")


@torch.no_grad()
def _perturb_(model: nn.Module, seed: int) -> None:
    """Random values in every parameter (the inits leave biases 0 and LayerNorms 1, 0, which
    would let a bias or a norm copied to the wrong place go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


# --- GPT vs Hugging Face GPT-2 -----------------------------------------------------------------


def _hf_gpt2_like(model: GPT) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel of ``model``'s shape holding ``model``'s weights."""
    cfg = model.cfg
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu", layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )).eval()
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}."
        for ours, theirs in ((block.ln_1, "ln_1"), (block.ln_2, "ln_2")):
            state[h + theirs + ".weight"], state[h + theirs + ".bias"] = ours.weight, ours.bias
        for ours, theirs in ((block.attn.qkv, "attn.c_attn"), (block.attn.proj, "attn.c_proj"),
                             (block.ffn.up, "mlp.c_fc"), (block.ffn.down, "mlp.c_proj")):
            state[h + theirs + ".weight"], state[h + theirs + ".bias"] = ours.weight.T, ours.bias  # Conv1D: [in, out]
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied to wte
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def test_the_gpt2_preset_has_gpt2_smalls_shape():
    cfg, gpt2_small = get_preset("gpt2-dense"), transformers.GPT2Config()  # the config defaults are GPT-2 small
    assert (cfg.vocab_size, cfg.block_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.d_ff) == (
        gpt2_small.vocab_size, gpt2_small.n_positions, gpt2_small.n_embd, gpt2_small.n_layer, gpt2_small.n_head,
        4 * gpt2_small.n_embd)
    assert cfg.layer_norm_eps == gpt2_small.layer_norm_epsilon and cfg.moe is None


def test_dense_gpt_logits_and_loss_equal_hugging_face_gpt2():
    torch.manual_seed(0)
    model = GPT(get_preset("debug-dense", vocab_size=97)).eval()
    _perturb_(model, seed=1)
    hf = _hf_gpt2_like(model)
    idx_BL = torch.randint(97, (3, model.cfg.block_size))
    with torch.no_grad():
        ours = model(idx_BL[:, :-1], idx_BL[:, 1:])
        theirs = hf(input_ids=idx_BL[:, :-1])
        theirs_loss = hf(input_ids=idx_BL, labels=idx_BL).loss  # HF shifts the labels itself
    torch.testing.assert_close(ours.logits_BLV, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs_loss, rtol=1e-5, atol=1e-6)


def test_gpt_greedy_decoding_with_its_cache_equals_hugging_face_generate():
    torch.manual_seed(0)
    model = GPT(get_preset("debug-dense", vocab_size=97)).eval()
    _perturb_(model, seed=2)
    hf = _hf_gpt2_like(model)
    prompt_BL = torch.randint(97, (2, 5))
    ours = model.generate(prompt_BL, max_new_tokens=12, temperature=0)
    theirs = hf.generate(prompt_BL, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt_BL))
    assert torch.equal(ours, theirs)


# --- Seq2Seq vs torch.nn.TransformerEncoder / TransformerDecoder --------------------------------


def _sinusoids(num_positions: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017), Sec. 3.5, entry by entry in float64."""
    table = torch.empty(num_positions, d_model, dtype=torch.float64)
    for p in range(num_positions):
        for i in range(0, d_model, 2):
            table[p, i] = math.sin(p / 10000 ** (i / d_model))
            table[p, i + 1] = math.cos(p / 10000 ** (i / d_model))
    return table.float()


class TorchTransformer(nn.Module):
    """The encoder-decoder out of torch's own layers, the FFN with exact GeLU as ours."""

    def __init__(self, model: Seq2Seq) -> None:
        super().__init__()
        cfg = self.cfg = model.cfg
        pre = cfg.norm == "pre"
        layer = dict(d_model=cfg.d_model, nhead=cfg.n_head, dim_feedforward=cfg.d_ff, dropout=0.0, activation="gelu",
                     layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=pre)
        final_norm = (lambda: nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)) if pre else (lambda: None)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), cfg.n_enc_layer, norm=final_norm(),
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), cfg.n_dec_layer, norm=final_norm())
        self.embed = nn.Parameter(model.embed.weight.detach().clone())
        self.register_buffer("pos_PD", _sinusoids(cfg.max_len, cfg.d_model))
        self._copy_from(model)

    @torch.no_grad()
    def _copy_from(self, model: Seq2Seq) -> None:
        def copy(theirs: nn.Module, *ours: nn.Module, weight: str = "weight", bias: str = "bias") -> None:
            """Their weight and bias = ours, stacked along dim 0 (Linear or LayerNorm)."""
            getattr(theirs, weight).copy_(torch.cat([m.weight for m in ours]))
            getattr(theirs, bias).copy_(torch.cat([m.bias for m in ours]))

        def attention(theirs: nn.MultiheadAttention, *in_proj: nn.Linear, out_proj: nn.Linear) -> None:
            copy(theirs, *in_proj, weight="in_proj_weight", bias="in_proj_bias")  # rows q, k, v in both
            copy(theirs.out_proj, out_proj)

        for theirs, ours in zip((*self.encoder.layers, *self.decoder.layers), (*model.encoder, *model.decoder)):
            attention(theirs.self_attn, ours.attn.qkv, out_proj=ours.attn.proj)
            if hasattr(theirs, "multihead_attn"):  # a decoder layer
                attention(theirs.multihead_attn, ours.cross.q, ours.cross.kv, out_proj=ours.cross.proj)
            copy(theirs.linear1, ours.ffn.up)
            copy(theirs.linear2, ours.ffn.down)
            for norm, our_norm in zip((theirs.norm1, theirs.norm2, getattr(theirs, "norm3", None)), ours.norms):
                copy(norm, our_norm)
        if self.cfg.norm == "pre":
            copy(self.encoder.norm, model.enc_norm)
            copy(self.decoder.norm, model.dec_norm)

    def forward(self, src_BS: torch.Tensor, tgt_in_BL: torch.Tensor) -> torch.Tensor:
        def embed(ids_BL: torch.Tensor) -> torch.Tensor:
            return self.embed[ids_BL] * math.sqrt(self.cfg.d_model) + self.pos_PD[: ids_BL.shape[1]]

        pad_BS = src_BS == self.cfg.pad_id
        memory = self.encoder(embed(src_BS), src_key_padding_mask=pad_BS)
        L = tgt_in_BL.shape[1]
        causal_LL = nn.Transformer.generate_square_subsequent_mask(L)
        h_BLD = self.decoder(embed(tgt_in_BL), memory, tgt_mask=causal_LL, tgt_is_causal=True,
                             memory_key_padding_mask=pad_BS)
        return h_BLD @ self.embed.T


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_dense_seq2seq_logits_equal_torch_transformer_layers(norm):
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_mt_preset("debug-dense", vocab_size=50), norm=norm)
    model = Seq2Seq(cfg).eval()
    _perturb_(model, seed=3)
    reference = TorchTransformer(model).eval()
    g = torch.Generator().manual_seed(4)
    src_BS = torch.randint(4, 50, (3, 11), generator=g)
    tgt_in_BL = torch.randint(4, 50, (3, 9), generator=g)
    src_BS[1, 6:] = cfg.pad_id  # right padding: masked as keys in both
    src_BS[2, 2:] = cfg.pad_id
    tgt_in_BL[2, 4:] = cfg.pad_id
    with torch.no_grad():
        ours = model(src_BS, tgt_in_BL).logits_BLV
        theirs = reference(src_BS, tgt_in_BL)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
