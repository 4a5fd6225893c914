"""XMoEForCausalLM: xmoe's GPT as a transformers model. Logits and greedy generations equal
xmoe's own; the threshold dial, the loss with labels, router logits and saving/loading behave
as transformers' MoE models do; a fresh process loads a saved folder with trust_remote_code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.moe import MoELayer, set_threshold

from helpers.hf import VOCAB, hf_from_gpt, tiny_gpt


@pytest.mark.parametrize("router", ["threshold", "topk"])
def test_logits_equal_xmoe_forward(router):
    gpt = tiny_gpt(router)
    model = hf_from_gpt(gpt)
    x = torch.randint(VOCAB, (3, 20))
    with torch.no_grad():
        out = model(x)
        expected = gpt(x).logits_BLV
    assert isinstance(out, MoeCausalLMOutputWithPast)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)


def test_dense_model_too():
    gpt = tiny_gpt(moe=False)
    x = torch.randint(VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf_from_gpt(gpt)(x).logits, gpt(x).logits_BLV, rtol=0, atol=1e-6)


def test_generate_with_kv_cache_gives_xmoe_greedy_tokens():
    gpt = tiny_gpt()
    model = hf_from_gpt(gpt)
    prompt = torch.randint(VOCAB, (1, 5))
    expected = gpt.generate(prompt, 20, temperature=0)
    cached = model.generate(prompt, max_new_tokens=20, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


@pytest.mark.parametrize("spelling", ["cache", "past_key_values"])
def test_either_cache_keyword_continues_the_sequence(spelling):
    model = hf_from_gpt(tiny_gpt())
    x = torch.randint(VOCAB, (2, 12))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(x[:, :7], **{spelling: cache}).logits
        second = model(x[:, 7:], **{spelling: cache}).logits
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-5)


def test_loss_from_labels_is_shifted_cross_entropy_plus_weighted_balancing_loss():
    model = hf_from_gpt(tiny_gpt())
    x = torch.randint(VOCAB, (2, 16))
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels, output_router_logits=True)
    logits = out.logits.double()
    # The independent loss: position i predicts labels[i + 1]; -100 skipped.
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    # The balancing loss recomputed from the returned router logits: E * sum_e f_e * P_e per layer.
    aux = 0.0
    for logits_TE in out.router_logits:
        probs = logits_TE.double().softmax(-1)
        f = F.one_hot(probs.argmax(-1), probs.shape[-1]).double().mean(0)
        aux = aux + probs.shape[-1] * (f * probs.mean(0)).sum()
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (32, 8)
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), ce + 0.01 * aux, rtol=1e-5, atol=1e-6)
    out.loss.backward()  # the Trainer's step: every router gets a gradient (through the balancing loss too)
    assert all(p.grad is not None for layer in model.moe_layers() for p in layer.parameters())


def test_router_entropy_loss_coef_adds_the_mean_router_entropy_of_each_layer():
    model = hf_from_gpt(tiny_gpt())
    x = torch.randint(VOCAB, (2, 16))
    plain = model(x, labels=x, output_router_logits=True)
    model.config.router_entropy_loss_coef = 0.5
    sharpened = model(x, labels=x)
    entropy = sum(-(p * p.log()).sum(-1).mean() for p in (z.double().softmax(-1) for z in plain.router_logits))
    torch.testing.assert_close(sharpened.loss.double(), plain.loss.double() + 0.5 * entropy, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="router_entropy_loss_coef"):
        XMoEConfig(router_entropy_loss_coef=-1.0)


def test_threshold_dial_changes_experts_and_is_saved_and_loaded(tmp_path):
    model = hf_from_gpt(tiny_gpt())
    x = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        at_09 = model(x)
        assert set_threshold(model, 0.3) == 2
        at_03 = model(x)
    experts = [sum(s.kept_per_token for s in out.routing_stats) for out in (at_09, at_03)]
    assert experts[1] < experts[0]
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["moe_threshold"] == 0.3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, XMoEForCausalLM) and loaded.config.moe_threshold == 0.3
    assert all(layer.threshold == 0.3 for layer in loaded.moe_layers())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, at_03.logits, rtol=0, atol=1e-6)


def test_auto_classes_know_the_model_type():
    cfg = AutoConfig.for_model("xmoe", vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32)
    assert isinstance(cfg, XMoEConfig) and cfg.num_hidden_layers == 2 and cfg.hidden_size == 16
    assert isinstance(AutoModelForCausalLM.from_config(cfg), XMoEForCausalLM)


def test_bad_inputs_are_clear_errors():
    model = hf_from_gpt(tiny_gpt())
    x = torch.randint(VOCAB, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, cached \+ new tokens\] = \[2, 6\]"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(VOCAB, (1, 49)))
    with pytest.raises(ValueError, match="not both"):
        model(x, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_head=4"):
        XMoEConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match=r"GPTConfig.dropout must be in \[0, 1\)"):
        XMoEConfig(dropout=1.5)


def test_a_fresh_process_loads_the_folder_with_trust_remote_code(tmp_path):
    """The folder carries its modeling code: a process that never imports xmoe itself loads it."""
    model = hf_from_gpt(tiny_gpt())
    set_threshold(model, 0.6)
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(VOCAB, (2, 10))
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "xmoe.hf" not in sys.modules
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
print(model.config.moe_threshold)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0.6"
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(x).logits, rtol=0, atol=1e-6)


def test_a_config_that_disagrees_with_its_weights_is_loud_and_never_nan(tmp_path):
    """Issue 23 item 7: config.json says 5 layers, the weights hold 4. transformers initialises
    the missing layer (our _init_weights, not uninitialised memory), and xmoe's loader refuses
    the folder naming what is missing."""
    from xmoe.errors import UsageError
    from xmoe.hf.folders import load_folder

    model = hf_from_gpt(tiny_gpt())
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["n_layer"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        logits = loaded(torch.randint(VOCAB, (2, 16))).logits
    assert torch.isfinite(logits).all()
    new = loaded.transformer.blocks[4]
    assert all(torch.isfinite(p).all() and p.abs().max() <= 1.0 for p in new.parameters())  # N(0, 0.02), LayerNorm 1
    with pytest.raises(UsageError, match=r"config.json does not describe its weights \(missing keys: "
                                         r"transformer\.blocks\.4\."):
        load_folder(tmp_path / "m")


def test_decoding_takes_the_small_token_path_in_xmoe_and_in_the_export():
    """A decode step routes one token: ``auto`` takes the small-T path ("direct") in xmoe's own
    generate and in the exported model's, whose layers are the same; the prompt goes as one call."""
    gpt = tiny_gpt()
    hf = hf_from_gpt(gpt)
    prompt = torch.randint(VOCAB, (1, 20))
    for model, generate in ((gpt, lambda: gpt.generate(prompt, 3, temperature=0)),
                            (hf, lambda: hf.generate(prompt, max_new_tokens=3, do_sample=False))):
        backends = []
        hooks = [layer.register_forward_hook(lambda _layer, _inputs, out: backends.append(out.backend))
                 for layer in model.modules() if isinstance(layer, MoELayer)]
        generate()
        for hook in hooks:
            hook.remove()
        assert backends == ["fused"] * 2 + ["direct"] * 4, backends  # 2 MoE layers x (prompt, 2 steps)


def test_a_budgeted_model_keeps_its_trained_t_through_export_and_from_pretrained(tmp_path):
    """A compute budget's t lives in the weights, one per layer: from_pretrained brings each
    back in float64, the unsaved per-step counts start at zero (not uninitialised memory), and
    a folder saved after the dial was turned to 1.0 still loads."""
    from xmoe.hf.folders import set_dial
    from xmoe.models.gpt import GPT, GPTConfig
    from xmoe.moe import MoEConfig, step_budgets

    cfg = GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=4, n_head=2, d_model=32, d_ff=64, moe_every=2,
                    moe=MoEConfig(model_dim=32, num_experts=8, expert_dim=16, target_experts=2.0, init_std=0.02))
    torch.manual_seed(0)
    gpt = GPT(cfg).train()
    for layer in gpt.moe_layers():
        with torch.no_grad():
            layer.router.weight.normal_(std=1.0 if layer is gpt.moe_layers()[0] else 0.1)
    for _ in range(5):
        gpt(torch.randint(VOCAB, (2, 16)))
        step_budgets(gpt)
    trained = [layer.threshold for layer in gpt.moe_layers()]
    assert len(set(trained)) == 2 and 0.9 not in trained  # the two layers' routers differ, so do their t
    hf_from_gpt(gpt.eval()).save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert [layer.threshold for layer in loaded.moe_layers()] == trained
    assert all(layer.router.dial.threshold.dtype == torch.float64 for layer in loaded.moe_layers())
    assert all(float(layer.router.dial.step_tokens) == 0 == float(layer.router.dial.step_pairs)
               for layer in loaded.moe_layers())
    assert set_dial(loaded, None) == "t per layer " + ", ".join(f"{t:.3g}" for t in trained) + " (as trained)"
    set_threshold(loaded, 1.0)
    loaded.save_pretrained(tmp_path / "dialled")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dialled")
    assert [layer.threshold for layer in again.moe_layers()] == [1.0, 1.0]


@pytest.mark.parametrize("kind", ["xmoe", "portable"])
def test_resize_token_embeddings_keeps_the_tied_output_layer(kind, tmp_path):
    from helpers.hf import portable_copy

    model = hf_from_gpt(tiny_gpt())
    model = portable_copy(model) if kind == "portable" else model
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 8)
    wte, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    assert lm_head.weight is wte.weight and wte.weight.shape == (VOCAB + 8, 32) and model.config.vocab_size == VOCAB + 8
    assert torch.equal(wte.weight[:VOCAB], old)
    x = torch.randint(VOCAB + 8, (2, 7))
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, 7, VOCAB + 8)
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, logits, rtol=0, atol=1e-6)


def test_the_static_cache_is_refused_with_what_to_do():
    model = hf_from_gpt(tiny_gpt())
    with pytest.raises(ValueError, match="dynamic cache only, not StaticCache: generate without cache_implementation"):
        model.generate(torch.randint(VOCAB, (1, 5)), max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_generation_past_block_size_slides_the_window_as_xmoe_generate_does():
    gpt = tiny_gpt()  # block_size 48
    model = hf_from_gpt(gpt)
    prompt = torch.randint(VOCAB, (2, 30))
    expected = gpt.generate(prompt, 40, temperature=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False), expected)
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=False), expected)
    with pytest.raises(ValueError, match="block_size"):  # a forward call is not windowed: too long is an error
        model(torch.randint(VOCAB, (1, 49)))


def test_load_folder_names_a_folder_that_holds_no_hugging_face_model(tmp_path):
    """A folder whose config.json names no model_type is said to hold no Hugging Face model, not
    a model of type None."""
    from xmoe.errors import UsageError
    from xmoe.hf.folders import load_folder

    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(UsageError, match=r"holds no Hugging Face model \(no config.json naming a model_type\); "
                                         r"this command takes an `xmoe export-hf` folder"):
        load_folder(tmp_path)
