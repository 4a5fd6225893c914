"""The dial in the config (issue 24 item 5): ``config.moe_threshold`` is the one setting. Edited
after loading it takes effect at the next call, save_pretrained keeps it, from_pretrained(...,
moe_threshold=t) loads at t, also over a compute budget's trained t; None routes each budgeted
layer at its trained t. xmoe's ``set_threshold`` works on xmoe's model too: the last one set
routes."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.hf import VOCAB, hf_from_gpt, portable_copy, tiny_gpt
from xmoe.hf import XMoEForCausalLM
from xmoe.hf.standalone.modeling_xmoe import XMoEForCausalLM as PortableXMoE
from xmoe.hf.standalone.xmoe_layer import Router
from xmoe.models.gpt import GPT, GPTConfig
from xmoe.moe import MoEConfig, set_threshold, step_budgets

X = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _experts_per_token(model) -> float:
    counts = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: counts.append(out.taken_TE.sum(-1).double().mean()))
             for m in model.modules() if isinstance(m, Router)]
    if not hooks:  # xmoe's layers: their routing statistics
        with torch.no_grad():
            return sum(s.kept_per_token for s in model(X).routing_stats) / 2
    with torch.no_grad():
        model(X)
    for hook in hooks:
        hook.remove()
    return float(sum(counts) / len(counts))


@pytest.mark.parametrize("kind", ["xmoe", "portable"])
def test_editing_config_moe_threshold_routes_at_it_and_save_pretrained_keeps_it(kind, tmp_path):
    gpt = tiny_gpt()
    model = hf_from_gpt(gpt)
    model = portable_copy(model) if kind == "portable" else model
    before = _experts_per_token(model)
    model.config.moe_threshold = 0.3
    after = _experts_per_token(model)
    assert after < before
    expected = hf_from_gpt(gpt)
    set_threshold(expected, 0.3)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, expected(X).logits, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["moe_threshold"] == 0.3
    for cls in (XMoEForCausalLM, PortableXMoE):  # either implementation reads the saved dial
        loaded = cls.from_pretrained(tmp_path / "m").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(X).logits, expected(X).logits, rtol=0, atol=1e-5)


def test_on_xmoe_model_the_last_of_set_threshold_and_a_config_edit_routes(tmp_path):
    model = hf_from_gpt(tiny_gpt())
    set_threshold(model, 0.5)
    model.config.moe_threshold = 0.3  # the later one
    model(X)
    assert {layer.threshold for layer in model.moe_layers()} == {0.3}
    set_threshold(model, 0.6)  # the later one
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["moe_threshold"] == 0.6
    model.config.moe_threshold = 0.4  # edited, not yet called: saving applies it
    model.save_pretrained(tmp_path / "m2")
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["moe_threshold"] == 0.4
    assert {layer.threshold for layer in model.moe_layers()} == {0.4}


def _budgeted_gpt() -> GPT:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=4, n_head=2, d_model=32, d_ff=64, moe_every=2,
                    moe=MoEConfig(model_dim=32, num_experts=8, expert_dim=16, target_experts=2.0, init_std=0.02))
    gpt = GPT(cfg).train()
    with torch.no_grad():
        gpt.moe_layers()[0].router.weight.normal_(std=1.0)
    for _ in range(5):
        gpt(torch.randint(VOCAB, (2, 16)))
        step_budgets(gpt)
    return gpt.eval()


@pytest.mark.parametrize("cls", [XMoEForCausalLM, PortableXMoE], ids=["xmoe", "portable"])
def test_a_budgeted_model_routes_at_its_trained_t_unless_a_threshold_is_given(cls, tmp_path):
    gpt = _budgeted_gpt()
    trained = [layer.threshold for layer in gpt.moe_layers()]
    assert len(set(trained)) == 2
    hf_from_gpt(gpt).save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["moe_threshold"] is None
    as_trained = cls.from_pretrained(tmp_path / "m").eval()
    at_05 = cls.from_pretrained(tmp_path / "m", moe_threshold=0.5).eval()
    reference = GPT(gpt.cfg).eval()
    reference.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(as_trained(X).logits, reference(X).logits_BLV, rtol=0, atol=1e-5)
        set_threshold(reference, 0.5)
        torch.testing.assert_close(at_05(X).logits, reference(X).logits_BLV, rtol=0, atol=1e-5)
    if cls is XMoEForCausalLM:
        assert [layer.threshold for layer in as_trained.moe_layers()] == trained
        assert [layer.threshold for layer in at_05.moe_layers()] == [0.5, 0.5]


def test_a_threshold_out_of_range_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"moe_threshold must be a number in \(0, 1\]"):
        PortableXMoE.config_class(moe_threshold=1.5)
