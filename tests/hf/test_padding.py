"""Batches with padding (issue 24 item 2): left padding in generation (positions count real
tokens), right padding in training, and pad tokens kept out of the MoE layers. Checked against
each prompt run alone, on xmoe's model and on the portable one exported folders carry."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from helpers.data import write_corpus
from helpers.hf import VOCAB, WORDS, byte_level_tokenizer, hf_from_gpt, portable_copy, tiny_gpt
from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.models.gpt import GPT, GPTConfig
from xmoe.moe import MoEConfig

PAD = 0


def _model(kind: str):
    model = hf_from_gpt(tiny_gpt())
    return portable_copy(model) if kind == "portable" else model


def _pad(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, each prompt padded with PAD to the longest."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


KINDS = ["xmoe", "portable"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_padded_batch_gives_each_prompt_its_own_logits(kind, side):
    model = _model(kind)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (5, 12, 9)]
    ids, mask = _pad(prompts, side)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_left_padding_equals_each_prompt_alone(kind):
    model = _model(kind)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (4, 11, 7)]
    ids, mask = _pad(prompts, "left")
    for new in (6, 45):  # 45: past block_size=48, where the window slides
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=new, do_sample=False, pad_token_id=PAD)
            assert torch.equal(batch[i, ids.shape[1]:], alone[0, len(p):]), (new, i)


def test_a_pipeline_generates_batches_of_prompts_of_different_lengths(tmp_path):
    tok = byte_level_tokenizer(write_corpus(tmp_path / "text.txt", num_lines=100, words=WORDS, length=10))
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    gpt = tiny_gpt()
    cfg = XMoEConfig.from_gpt_config(GPTConfig(**{**gpt.cfg.__dict__, "vocab_size": len(tok)}),
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = XMoEForCausalLM(cfg).eval()
    prompts = ["the lazy dog", "sparse experts route every token while the quick brown fox", "over"]
    generate = tf.pipeline("text-generation", model=model, tokenizer=tok)
    alone = [generate(p, max_new_tokens=8, do_sample=False)[0]["generated_text"] for p in prompts]
    batched = [out[0]["generated_text"] for out in generate(prompts, batch_size=3, max_new_tokens=8, do_sample=False)]
    assert batched == alone and all(a != p for a, p in zip(alone, prompts))


def _capacity_model(kind: str):
    """A model whose layers drop pairs in training (capacity factor 1, 8 experts)."""
    cfg = GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, moe_every=2,
                    moe=MoEConfig(model_dim=32, num_experts=8, expert_dim=16, init_std=0.02, capacity_factor=1.0,
                                  min_capacity=1))
    gpt = GPT(cfg)
    with torch.no_grad():
        gpt.moe_layers()[0].router.weight.normal_(std=1.0)
    model = hf_from_gpt(gpt)
    return (portable_copy(model) if kind == "portable" else model).train()


@pytest.mark.parametrize("kind", KINDS)
def test_right_padding_in_training_changes_neither_the_balancing_loss_nor_the_dropped_pairs(kind):
    model = _capacity_model(kind)
    x = torch.randint(1, VOCAB, (2, 16))
    padded = torch.cat([x, torch.full((2, 15), PAD)], dim=1)  # 30 pad tokens
    mask = (padded != PAD).long()
    labels = padded.masked_fill(mask == 0, -100)
    plain = model(x, labels=x)
    with_pads = model(padded, attention_mask=mask, labels=labels)
    torch.testing.assert_close(with_pads.aux_loss, plain.aux_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_pads.loss, plain.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_pads.logits[:, :16], plain.logits, rtol=0, atol=1e-5)
    if kind == "xmoe":  # xmoe's capacity: pads take none of it
        dropped = [s.dropped_pairs for s in plain.routing_stats]
        assert dropped[0] > 0 and [s.dropped_pairs for s in with_pads.routing_stats] == dropped
