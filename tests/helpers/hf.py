"""Tiny models for tests/hf: an xmoe GPT with sharpened routers, and the four transformers MoE
families adaptive() supports, built from configs (a few layers, hidden 32, 8 experts)."""

from __future__ import annotations

import torch
import transformers as tf

from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.hf.adaptive import moe_blocks
from xmoe.models import GPT, GPTConfig
from xmoe.moe import MoEConfig

VOCAB = 64


def tiny_gpt(router: str = "threshold", *, moe: bool = True) -> GPT:
    """A 4-layer xmoe GPT (MoE in layers 2 and 4, 8 experts) whose routers are sharp enough that
    t = 0.9 engages different numbers of experts per token."""
    cfg = GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=4, n_head=2, d_model=32, d_ff=64, moe_every=2,
                    moe=MoEConfig(model_dim=32, num_experts=8, expert_dim=16, router=router, threshold=0.9, top_k=2,
                                  init_std=0.02) if moe else None)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            for p in layer.router.parameters():
                p.normal_(std=1.0)
    return model


def hf_from_gpt(gpt: GPT) -> XMoEForCausalLM:
    model = XMoEForCausalLM(XMoEConfig.from_gpt_config(gpt.cfg)).eval()
    model.transformer.load_state_dict(gpt.state_dict())
    return model


def portable_copy(model: XMoEForCausalLM) -> torch.nn.Module:
    """The portable model (xmoe.hf.standalone, what exported folders carry) with ``model``'s
    config and weights (every key, strict), in eval mode."""
    from xmoe.hf.standalone.modeling_xmoe import XMoEForCausalLM as Portable

    portable = Portable(Portable.config_class.from_dict(model.config.to_dict())).eval()
    portable.load_state_dict(model.state_dict(), strict=True)
    return portable


_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               max_position_embeddings=64, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def family_config(family: str, **overrides) -> tf.PretrainedConfig:
    """A tiny config of ``family``: 8 experts, top-2."""
    if family == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2, **_COMMON)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=2, **_COMMON)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                head_dim=16, **_COMMON)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **_COMMON)
    else:
        raise AssertionError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_family(family: str, **overrides) -> torch.nn.Module:
    """A randomly initialised model of ``family`` in eval mode, its routers sharpened (std 1)."""
    model = tf.AutoModelForCausalLM.from_config(family_config(family, **overrides)).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(std=1.0)
    return model


FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")


# the words of the text the Hugging Face tests tokenize and evaluate on
WORDS = "the quick brown fox jumps over the lazy dog while sparse experts route every token".split()


def byte_level_tokenizer(text_path) -> tf.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer (300 tokens, <|endoftext|>) trained on ``text_path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(text_path)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
