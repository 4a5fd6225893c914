"""The self-contained export (issue 24 item 1): the modeling code an exported folder carries
(xmoe.hf.standalone) imports only torch and transformers, gives xmoe's logits, experts per
token and greedy generations, and a process where xmoe cannot be imported loads the folder,
its tokenizer too. The folder records the xmoe version, has a model card and the standard MoE
config fields."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

import xmoe
from xmoe.hf import XMoEConfig, export_model
from xmoe.hf.standalone import FILES, FOLDER
from xmoe.hf.standalone.xmoe_layer import Router
from xmoe.models.gpt import GPT, GPTConfig
from xmoe.moe import MoEConfig, step_budgets

from helpers.data import write_corpus
from helpers.hf import VOCAB, WORDS, byte_level_tokenizer, hf_from_gpt, portable_copy, tiny_gpt

# Run first in the subprocess: any import of xmoe fails, as where it is not installed.
NO_XMOE = """
import sys
class NoXMoE:
    def find_spec(self, name, path=None, target=None):
        if name == "xmoe" or name.startswith("xmoe."):
            raise ImportError(f"no module named {name!r} (xmoe is hidden in this test)")
sys.meta_path.insert(0, NoXMoE())
"""


def test_the_portable_files_import_only_torch_transformers_and_each_other():
    for name in FILES:
        tree = ast.parse((FOLDER / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." + node.module if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"__future__", "dataclasses", "torch", "transformers", ".configuration_xmoe",
                             ".xmoe_layer"}, (name, roots)


def _gpt(**moe) -> GPT:
    cfg = GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=4, n_head=2, d_model=32, d_ff=64, moe_every=2,
                    moe_output_bias=moe.pop("moe_output_bias", False),
                    moe=MoEConfig(model_dim=32, num_experts=8, expert_dim=16, init_std=0.02, **moe))
    torch.manual_seed(0)
    gpt = GPT(cfg).eval()
    with torch.no_grad():
        for layer in gpt.moe_layers():
            layer.router.weight.normal_(std=1.0)
            if gpt.cfg.moe_output_bias:
                gpt.blocks[1].ffn_bias.normal_(std=0.1)
    return gpt


def _budgeted() -> GPT:
    """Trained t per layer (a compute budget): the two layers' t differ."""
    gpt = _gpt(target_experts=2.0).train()
    with torch.no_grad():
        gpt.moe_layers()[1].router.weight.mul_(0.1)
    for _ in range(5):
        gpt(torch.randint(VOCAB, (2, 16)))
        step_budgets(gpt)
    return gpt.eval()


MODELS = {
    "threshold": lambda: tiny_gpt(),
    "topk": lambda: tiny_gpt("topk"),
    "swiglu-nobias-renormalize-max2-outputbias": lambda: _gpt(activation="swiglu", expert_bias=False,
                                                              renormalize=True, max_experts=2, moe_output_bias=True),
    "relu-ones": lambda: _gpt(activation="relu", combine="ones", threshold=0.6),
    "gelu_tanh": lambda: _gpt(activation="gelu_tanh", threshold=0.5),
    "budgeted": _budgeted,
    "dense": lambda: tiny_gpt(moe=False),
}


def _taken(model, x, **kwargs) -> list[torch.Tensor]:
    """bool [T, E] per MoE layer: the pairs the portable model's routers took."""
    taken = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: taken.append(out.taken_TE))
             for m in model.modules() if isinstance(m, Router)]
    with torch.no_grad():
        logits = model(x, **kwargs).logits
    for hook in hooks:
        hook.remove()
    return logits, taken


@pytest.mark.parametrize("kind", MODELS)
def test_the_portable_model_computes_what_xmoe_computes(kind):
    gpt = MODELS[kind]()
    model = hf_from_gpt(gpt)
    portable = portable_copy(model)
    x = torch.randint(VOCAB, (3, 20))
    with torch.no_grad():
        out = model(x)
    logits, taken = _taken(portable, x)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
    assert len(taken) == len(out.routing_stats) == (0 if kind == "dense" else 2)
    for taken_TE, stats in zip(taken, out.routing_stats):
        assert torch.equal(taken_TE, stats._kept_TE)  # the same experts for every token
    if kind != "topk" and kind != "dense":
        counts = torch.stack([t.sum(-1) for t in taken])
        assert counts.min() < counts.max()  # the rule engaged different numbers of experts
    prompt = x[:1, :6]  # 6 + 50 tokens: past block_size=48, the window slides
    expected = gpt.generate(prompt, 50, temperature=0)
    assert torch.equal(portable.generate(prompt, max_new_tokens=50, do_sample=False), expected)


def _export_gpt(tmp_path):
    tok = byte_level_tokenizer(write_corpus(tmp_path / "text.txt", num_lines=100, words=WORDS, length=10))
    tok.save_pretrained(tmp_path / "tok")
    gpt = _gpt()
    gpt = GPT(GPTConfig(**{**gpt.cfg.__dict__, "vocab_size": len(tok)})).eval()
    with torch.no_grad():
        for layer in gpt.moe_layers():
            layer.router.weight.normal_(std=1.0)
    export_model(gpt, tmp_path / "hf", tokenizer_file=tmp_path / "tok" / "tokenizer.json", eot_token="<|endoftext|>",
                 results={"step": 200, "loss": 3.21, "experts_per_token": 2.5})
    return gpt, tok


def run_without_xmoe(folder, tmp_path, x: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``folder`` in a process that cannot import xmoe (run from an empty folder, without
    PYTHONPATH); its logits for ``x`` and its greedy continuation of ``x[:1]``."""
    torch.save(x, tmp_path / "x.pt")
    script = NO_XMOE + f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = {str(folder)!r}
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert not [name for name in sys.modules if name.split(".")[0] == "xmoe"]
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    logits = model(x).logits
tokens = model.generate(x[:1], max_new_tokens={max_new_tokens}, do_sample=False,
                        pad_token_id=tokenizer.eos_token_id or 0)
torch.save((logits, tokens), {str(tmp_path / 'out.pt')!r})
"""
    (tmp_path / "cwd").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path / "cwd", env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_an_exported_xmoe_model_loads_and_generates_where_xmoe_is_not_installed(tmp_path):
    gpt, tok = _export_gpt(tmp_path)
    ids = tok("the lazy fox routes every token while sparse experts jump over the dog")["input_ids"]
    x = torch.tensor([ids[:8], ids[-8:]])
    logits, tokens = run_without_xmoe(tmp_path / "hf", tmp_path, x, max_new_tokens=60)
    with torch.no_grad():
        torch.testing.assert_close(logits, gpt(x).logits_BLV, rtol=0, atol=1e-5)
    assert torch.equal(tokens, gpt.generate(x[:1], 60, temperature=0))  # past block_size=48 too


def test_the_folder_records_the_version_the_moe_fields_and_a_model_card(tmp_path):
    _export_gpt(tmp_path)
    folder = tmp_path / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["xmoe_version"] == xmoe.__version__
    assert (config["num_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert (config["router_aux_loss_coef"], config["output_router_logits"]) == (0.01, False)
    assert config["pad_token_id"] == config["eos_token_id"] == 0  # the end-of-text token pads batches
    assert config["auto_map"] == {"AutoConfig": "configuration_xmoe.XMoEConfig",
                                  "AutoModelForCausalLM": "modeling_xmoe.XMoEForCausalLM"}
    for name in ("configuration_xmoe.py", "xmoe_layer.py", "modeling_xmoe.py"):
        code = (folder / name).read_text()
        assert code.startswith(f"# Written by xmoe {xmoe.__version__}") and "import xmoe" not in code
    card = (folder / "README.md").read_text()
    assert "arXiv 2403.18926" in card and "config.moe_threshold" in card and "Saved: t = 0.9" in card
    assert "| loss | 3.21 |" in card and "| experts_per_token | 2.5 |" in card
    with pytest.raises(ValueError, match="num_experts=4 disagrees with moe"):
        XMoEConfig(d_model=32, moe=dict(config["moe"]), num_experts=4)


def test_a_budgeted_model_card_says_each_layer_keeps_its_trained_t(tmp_path):
    export_model(_budgeted(), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["moe_threshold"] is None
    assert "each layer's t as its compute-budget controller left it" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_exported_converted_model_loads_and_generates_where_xmoe_is_not_installed(family, tmp_path, capsys):
    from xmoe.cli.main import main
    from xmoe.conversion import ConversionConfig, RouterFitConfig
    from xmoe.conversion.hf import convert_hf, load_converted, save_converted

    tok = byte_level_tokenizer(write_corpus(tmp_path / "text.txt", num_lines=100, words=WORDS, length=10))
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=2, n_head=2,
                                                 n_inner=64)).eval()
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                   max_position_embeddings=48)).eval()
    convert_hf(model, torch.randint(len(tok), (4, 16)), ConversionConfig(num_experts=4, threshold=0.8,
                                                                         router=RouterFitConfig(steps=20)))
    save_converted(model, tmp_path / "converted", tokenizer=tok)
    main(["export-hf", "--checkpoint", str(tmp_path / "converted"), "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["xmoe_version"] == xmoe.__version__ and config["num_experts"] == 4
    assert "modeling_xmoe.py" not in os.listdir(tmp_path / "hf")
    reference = load_converted(tmp_path / "converted")
    x = torch.tensor([tok("the lazy fox routes")["input_ids"]])
    logits, tokens = run_without_xmoe(tmp_path / "hf", tmp_path, x, max_new_tokens=8)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(x).logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, reference.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id))


def test_a_model_that_evaluates_with_capacity_is_exported_only_dropless(tmp_path):
    """The folder's code has no capacity: exporting a model whose evaluation drops pairs is
    refused (saving it directly warns), and ``dropless=True`` writes it to route dropless, computing what xmoe computes
    dropless (and not what it computes with capacity: the check is not vacuous)."""
    from xmoe.errors import UsageError
    from xmoe.hf.standalone.modeling_xmoe import XMoEForCausalLM as Portable

    gpt = _gpt(capacity_factor=1.0, eval_capacity_factor=0.5)
    with pytest.raises(UsageError, match="--dropless"):
        export_model(gpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.warns(UserWarning, match="eval_capacity_factor=0.5"):  # the Trainer's checkpoints still save
        hf_from_gpt(gpt).save_pretrained(tmp_path / "direct")

    export_model(gpt, tmp_path / "hf", dropless=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["moe"]["eval_capacity_factor"] is None
    x = torch.randint(VOCAB, (3, 20))
    with torch.no_grad():
        capped = gpt(x).logits_BLV
        for layer in gpt.moe_layers():
            layer.router.dial.eval_capacity_factor = None
        dropless = gpt(x).logits_BLV
        exported = Portable.from_pretrained(tmp_path / "hf").eval()(x).logits
    torch.testing.assert_close(exported, dropless, rtol=0, atol=1e-5)
    assert not torch.allclose(capped, dropless, atol=1e-3)
