"""Incremental decoding with the KV cache: the same logits and the same MoE routing as a full
forward pass, and generate() on top of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.gpt import kept_BLE, record_routing, sharpen_routers, tiny_config
from xmoe.models import GPT


def _moe_model(router="threshold", **kw):
    model = GPT(tiny_config(router=router, **kw)).eval()
    sharpen_routers(model)
    return model


@pytest.mark.parametrize("router", ["threshold", "topk", None])
def test_cached_forward_equals_full_forward(router):
    """Prefill 7, a chunk of 3 (exercises the offset causal mask), then one token at a time."""
    model = _moe_model(router)
    B, L = 2, 20
    idx = torch.randint(0, 50, (B, L))
    with torch.no_grad(), record_routing(model) as full_calls:
        full = model(idx).logits_BLV
    cache = model.new_cache()
    pieces = [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, L)]
    with torch.no_grad(), record_routing(model) as inc_calls:
        inc = torch.cat([model(idx[:, a:b], cache=cache).logits_BLV for a, b in pieces], dim=1)
    assert cache.position == L
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)
    for i in full_calls:
        full_kept = kept_BLE(full_calls[i], B)
        assert torch.equal(kept_BLE(inc_calls[i], B), full_kept)
        # routing varies between tokens, so the comparison means something
        assert len(torch.unique(full_kept.reshape(-1, full_kept.shape[-1]), dim=0)) > 1
        if router == "threshold":
            assert full_kept.sum(-1).min() < full_kept.sum(-1).max()


def test_greedy_generation_matches_uncached_loop_and_full_forward_routing():
    model = _moe_model()
    prompt = torch.randint(0, 50, (2, 5))
    with record_routing(model) as gen_calls:
        out = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)

    naive = prompt
    with torch.no_grad():
        for _ in range(12):
            naive = torch.cat([naive, model(naive).logits_BLV[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, naive)

    # every token that was fed through the model was routed as in one full forward pass
    with torch.no_grad(), record_routing(model) as full_calls:
        model(out[:, :-1])
    for i in full_calls:
        assert len(gen_calls[i]) == 12  # prefill + 11 single-token steps
        assert torch.equal(kept_BLE(gen_calls[i], 2), kept_BLE(full_calls[i], 2))


def test_generation_past_block_size_crops_the_context():
    # large weights: the next token depends on the whole context, so a wrong crop shows
    model = GPT(dataclasses.replace(tiny_config(block_size=12), init_std=0.5)).eval()
    sharpen_routers(model)
    prompt = torch.randint(0, 50, (4, 15))  # longer than the context already
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0)
    naive = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(naive[:, -12:]).logits_BLV[:, -1].argmax(-1, keepdim=True)
            naive = torch.cat([naive, nxt], dim=1)
    assert torch.equal(out, naive)


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = GPT(tiny_config(dropout=0.5, capacity_factor=1.0))
    sharpen_routers(model)
    prompt = torch.randint(0, 50, (2, 6))
    a = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert model.training
    b = model.eval().generate(prompt, max_new_tokens=8, temperature=0.0)
    assert torch.equal(a, b)


def test_sampling_options():
    model = _moe_model()
    prompt = torch.randint(0, 50, (3, 4))
    greedy = model.generate(prompt, 6, temperature=0.0)
    assert torch.equal(model.generate(prompt, 6, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 6, top_p=1e-6), greedy)

    def sample(seed, **kw):
        return model.generate(prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    # top_k=3: every sampled token is among the 3 likeliest at its step
    out = sample(3, top_k=3)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits_BLV[:, 3:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[:, 4:, None]).any(-1).all()
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.parametrize(
    "kw, match",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"max_new_tokens": -1}, "max_new_tokens")],
)
def test_generate_validates_sampling_arguments(kw, match):
    model = _moe_model()
    args = {"max_new_tokens": 2} | kw
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **args)


def test_generation_with_eval_capacity_warns():
    model = GPT(tiny_config(eval_capacity_factor=1.0))
    with pytest.warns(UserWarning, match="eval_capacity_factor"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 1)


def test_kv_cache_bounds_and_batch_size():
    model = _moe_model(block_size=8)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(2, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch size 2"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    assert cache.position == 8
