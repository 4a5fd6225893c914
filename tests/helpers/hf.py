"""Tiny models for tests/hf: an xmoe GPT with sharpened routers, and the transformers MoE
families adaptive() supports, built from configs (two layers, hidden 32, 8 or 16 experts)."""

from __future__ import annotations

import torch
import transformers as tf

from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.hf.adaptive import moe_routers
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


_LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                         linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2)
_SIGMOID = dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=16, n_shared_experts=1,
                num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=0)
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8)


def family_config(family: str, **overrides) -> tf.PretrainedConfig:
    """A tiny config of ``family``: 8 experts, top-2 (gpt-oss: top-4; the sigmoid families: 16
    experts in 4 groups, top-4 from the best 2 groups)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0}  # a fresh dict: configs edit theirs in place
    if family == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2, **_COMMON)
    elif family == "flex_olmo":
        cfg = tf.FlexOlmoConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2, **_COMMON)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=2, **_COMMON)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                head_dim=16, **_COMMON)
    elif family == "qwen3_next":
        cfg = tf.Qwen3NextConfig(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                 num_experts=8, num_experts_per_tok=2, head_dim=16, **_LINEAR_ATTENTION, **_COMMON)
    elif family == "qwen3_5_moe":
        cfg = tf.Qwen3_5MoeTextConfig(moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8,
                                      num_experts_per_tok=2, head_dim=16, **_LINEAR_ATTENTION, **_COMMON)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **_COMMON)
    elif family == "gemma4":
        cfg = tf.Gemma4TextConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=8, top_k_experts=2,
                                  enable_moe_block=True, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                                  num_kv_shared_layers=0, **_COMMON)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(intermediate_size=16, num_local_experts=8, num_experts_per_tok=4, head_dim=16,
                              sliding_window=8, rope_parameters=rope, **_COMMON)
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**_SIGMOID, **_MLA, rope_parameters=rope, **_COMMON)
    elif family == "glm4_moe":
        cfg = tf.Glm4MoeConfig(**_SIGMOID, head_dim=16, rope_parameters=rope, **_COMMON)
    elif family == "glm4_moe_lite":
        cfg = tf.Glm4MoeLiteConfig(**{**_SIGMOID, "n_group": 1, "topk_group": 1}, **_MLA, rope_parameters=rope,
                                   mlp_layer_types=["sparse", "sparse"], **_COMMON)
    else:
        raise AssertionError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_family(family: str, **overrides) -> torch.nn.Module:
    """A randomly initialised model of ``family`` in eval mode, its routers sharpened and their
    other routing parameters random (biases, per-expert scales), so that every term of a
    family's rule is exercised."""
    model = tf.AutoModelForCausalLM.from_config(family_config(family, **overrides)).eval()
    with torch.no_grad():
        for router in moe_routers(model):
            # std 1 (0.3 for sigmoid scores, which std 1 would saturate at 0 or 1 and make flat)
            std = 0.3 if hasattr(router, "e_score_correction_bias") else 1.0
            (router.proj.weight if family == "gemma4" else router.weight).normal_(std=std)
            for name in ("bias", "e_score_correction_bias"):  # gpt-oss; the sigmoid families
                if hasattr(router, name):
                    getattr(router, name).normal_(std=0.5 if name == "bias" else 0.1)
            if family == "gemma4":  # its input scale and per-expert output scales
                router.scale.uniform_(0.5, 1.5)
                router.per_expert_scale.uniform_(0.5, 1.5)
    return model


# model_type of each family adaptive() supports, as family_config builds them
FAMILIES = ("olmoe", "flex_olmo", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "mixtral", "gemma4", "gpt_oss",
            "deepseek_v3", "glm4_moe", "glm4_moe_lite")


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
