"""An adapted model still works as a transformers model, for every supported family:
``output_router_logits=True`` records the routers, every experts implementation runs the unused
slots harmlessly, generation with the KV cache equals generation without it, saving writes the
original weights, and what cannot be adapted is refused with the reason."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

from xmoe.hf import adaptive, experts_per_token, is_adapted
from xmoe.hf.adaptive import moe_routers, own_top_k

from helpers.hf import FAMILIES, VOCAB, tiny_family


def router_outputs(model, x):
    with torch.no_grad():
        out = model(x, output_router_logits=True)
    return getattr(out, "router_logits", None), getattr(out, "aux_loss", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_router_logits_records_every_adapted_router(family):
    model = tiny_family(family)
    x = torch.randint(VOCAB, (2, 9))
    reference, reference_aux = router_outputs(model, x)  # installs transformers' recording hooks
    if reference is None:  # e.g. DeepSeek-V3, GLM-4.5, Gemma-4 under transformers 5.17
        pytest.skip(f"transformers {tf.__version__} returns no router logits for {family}, adapted or not")
    assert len(reference) == len(moe_routers(model))
    adaptive(model, threshold=1.0, max_experts=own_top_k(model))
    logits, aux = router_outputs(model, x)
    assert len(logits) == len(reference)  # each router recorded once, by the hooks installed before
    for got, expected in zip(logits, reference):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if reference_aux is not None:
        torch.testing.assert_close(aux, reference_aux, rtol=0, atol=1e-5)
    fresh = adaptive(tiny_family(family), threshold=0.5)  # adapted before any recording
    logits, _ = router_outputs(fresh, x)
    assert [tuple(t.shape) for t in logits] == [tuple(t.shape) for t in reference]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_experts_implementation_runs_an_adapted_model(family):
    model = adaptive(tiny_family(family), threshold=0.6)
    x = torch.randint(VOCAB, (2, 9))
    with torch.no_grad(), experts_per_token(model) as counts:
        reference = model(x).logits
    assert sum(c > 0 for c in counts.histogram) >= 2  # tokens with fewer experts leave slots unused
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, reference, rtol=0, atol=1e-5, msg=implementation)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_the_kv_cache_equals_generation_without(family):
    model = tiny_family(family)
    prompt = torch.randint(VOCAB, (2, 4))
    greedy = dict(max_new_tokens=8, do_sample=False)
    reference = model.generate(prompt, **greedy)
    adaptive(model, threshold=1.0, max_experts=own_top_k(model))
    assert torch.equal(model.generate(prompt, **greedy), reference)
    adaptive(model, threshold=0.4)
    cached = model.generate(prompt, **greedy)
    assert cached.shape == reference.shape
    assert torch.equal(model.generate(prompt, use_cache=False, **greedy), cached)


def test_saving_an_adapted_model_writes_the_original_weights(tmp_path):
    model = tiny_family("mixtral")
    x = torch.randint(VOCAB, (1, 8))
    with torch.no_grad():
        reference = model(x).logits
    adaptive(model, threshold=0.5)
    model.save_pretrained(tmp_path / "m")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not is_adapted(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference, rtol=0, atol=1e-6)


def test_bad_input_is_refused_clearly():
    model = tiny_family("olmoe")
    for bad in (0, -0.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="threshold must be a number > 0"):
            adaptive(model, threshold=bad)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="max_experts must be an integer from 1 to the model's 8 experts"):
            adaptive(model, threshold=0.5, max_experts=bad)
    with pytest.raises(ValueError, match=r"from 1 to the model's own top-4 \(gpt-oss weighs only the experts it picks"):
        adaptive(tiny_family("gpt_oss"), threshold=0.5, max_experts=5)
    adaptive(model, threshold=0.5)
    with pytest.raises(ValueError, match="inference only"):
        model.train()


def test_models_without_a_rule_are_refused_with_the_reason():
    granite = tf.AutoModelForCausalLM.from_config(tf.GraniteMoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    for model, name in ((granite, "GraniteMoeForCausalLM (model_type 'granitemoe')"),
                        (gpt2, "GPT2LMHeadModel (model_type 'gpt2')")):
        with pytest.raises(ValueError) as refused:
            adaptive(model, threshold=0.5)
        message = str(refused.value)
        assert f"no threshold rule for {name}" in message and "olmoe, flex_olmo, qwen2_moe" in message
        assert "its own rule, tested to reproduce the model exactly" in message
        assert "probability mass" not in message
    dense_gemma = tf.AutoModelForCausalLM.from_config(tf.Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, layer_types=["full_attention"], hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, enable_moe_block=False))
    with pytest.raises(ValueError, match=r"Gemma4ForCausalLM \(model_type 'gemma4_text'\) has no sparse MoE block"):
        adaptive(dense_gemma, threshold=0.5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_an_offloaded_model_is_adapted_through_its_hooks(family):
    """accelerate's offloading (device_map with offload, ``cpu_offload``) wraps every module's
    forward on the instance, weights moved in only for the call: the adapted routers run the
    threshold rule inside those hooks, and the outputs equal an adapted copy never offloaded."""
    import copy

    from accelerate import cpu_offload

    model = tiny_family(family)
    plain = copy.deepcopy(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert all("forward" in vars(router) for router in moe_routers(model))  # the hooks' wrappers
    x = torch.randint(VOCAB, (2, 9))
    for threshold in (0.3, 0.9):
        adaptive(model, threshold=threshold)
        adaptive(plain, threshold=threshold)
        with torch.no_grad(), experts_per_token(model) as offloaded, experts_per_token(plain) as reference:
            got, expected = model(x).logits, plain(x).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert offloaded.mean == reference.mean
    assert offloaded.mean > 1.0  # t = 0.9 engages more than one expert: the rule ran, not the family's own


def test_removing_the_offloading_hooks_before_or_after_adapting_keeps_the_rule():
    """accelerate's remove_hook_from_module leaves each module's forward on the instance, bound:
    the family's own before adapting, the rule's after. Adapting (again) follows either."""
    import copy

    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    x = torch.randint(VOCAB, (2, 9))
    base = tiny_family("qwen3_moe")
    before, after = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        expected = adaptive(base, threshold=0.5)(x).logits
    for model in (before, after):
        cpu_offload(model, execution_device=torch.device("cpu"))
    remove_hook_from_module(before, recurse=True)
    adaptive(before, threshold=0.5)
    adaptive(after, threshold=0.9)
    remove_hook_from_module(after, recurse=True)
    adaptive(after, threshold=0.5)
    with torch.no_grad():
        for model in (before, after):
            torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)


def test_a_router_whose_forward_is_replaced_otherwise_is_refused():
    model = tiny_family("qwen3_moe")
    router = moe_routers(model)[1]
    router.forward = lambda hidden_states: type(router).forward(router, hidden_states)
    with pytest.raises(ValueError, match="forward is replaced on the module itself"):
        adaptive(model, threshold=0.5)
    assert not is_adapted(model)  # refused before any router changed


def test_the_commands_take_a_multimodal_checkpoint_of_a_supported_family(tmp_path):
    """Gemma-4 and Qwen3.5-MoE checkpoints keep their experts in a text_config: the Hugging Face
    commands still recognise them as MoE folders."""
    from xmoe.checkpoint_kind import checkpoint_kind
    from xmoe.hf import SUPPORTED_FAMILIES

    for model_type, text in (("gemma4", {"num_experts": 128, "enable_moe_block": True}),
                             ("qwen3_5_moe", {"num_experts": 256})):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, "text_config": text}))
        assert checkpoint_kind(folder).kind == "hf" and model_type in SUPPORTED_FAMILIES


@pytest.mark.parametrize("family", ["gemma4", "gpt_oss", "deepseek_v3"])
def test_sweep_threshold_on_a_folder_of_a_new_family(family, tmp_path, capsys):
    from helpers.cli import run_cli
    from helpers.data import write_corpus
    from helpers.hf import WORDS, byte_level_tokenizer

    text = write_corpus(tmp_path / "text.txt", num_lines=100, words=WORDS, length=10)
    tokenizer = byte_level_tokenizer(text)
    model = tiny_family(family, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    k = own_top_k(model)
    run_cli(["sweep-threshold", "--checkpoint", str(tmp_path / family), "--data", str(text), "--max-batches", "1",
             "--thresholds", "0.5", "1.0", "--max-experts", str(k), "--out", str(tmp_path)], capsys)
    own, half, full = json.loads((tmp_path / "threshold_sweep_text.json").read_text())["rows"]
    assert own["routing"] == f"top-{k} (the model's own)" and own["experts_per_token"] == k
    assert half["experts_per_token"] < k and full["perplexity"] == pytest.approx(own["perplexity"], rel=1e-5)
