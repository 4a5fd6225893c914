"""`xmoe lm-eval` / xmoe.hf.harness: lm-evaluation-harness tasks at several thresholds, offline, on
a tiny OLMoE and a tiny xmoe export with a task file written here. The harness's log-likelihoods
and accuracies are recomputed by hand (float64 log-softmax over the model's logits), and the
FLOPs from the configs' shapes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from helpers.cli import run_cli as run
from helpers.data import write_corpus
from helpers.hf import FAMILIES, WORDS, byte_level_tokenizer, tiny_family
from xmoe.cli.main import main
from xmoe.errors import UsageError
from xmoe.hf import XMoEConfig, XMoEForCausalLM, adaptive
from xmoe.hf.harness import expert_flops, run_tasks
from xmoe.models import GPTConfig
from xmoe.moe import MoEConfig

TASK = "xmoe_tiny_choice"


@pytest.fixture(scope="module")
def task_and_tokenizer(tmp_path_factory):
    """A multiple-choice task of 8 questions (YAML + JSON lines) and a tokenizer trained on its words."""
    root = tmp_path_factory.mktemp("harness")
    text = write_corpus(root / "text.txt", num_lines=300, words=WORDS, length=10)
    docs = [{"question": " ".join(WORDS[i:i + 4]), "choices": [" fox", " dog", " lazy experts"], "answer": i % 3}
            for i in range(8)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (root / "task.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    return root, byte_level_tokenizer(text)


def loglikelihood_by_hand(model, tokenizer, context: str, continuation: str) -> float:
    whole, prefix = tokenizer(context + continuation)["input_ids"], tokenizer(context)["input_ids"]
    assert whole[:len(prefix)] == prefix  # the continuation's tokens follow the context's
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(prefix), len(whole)))


def check_against_hand(point, result, model, tokenizer) -> None:
    correct = []
    for sample in result["samples"][TASK]:
        by_hand = [loglikelihood_by_hand(model, tokenizer, *args) for args in sample["arguments"]]
        harness = [ll for ll, _greedy in sample["filtered_resps"]]
        assert harness == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
        correct.append(max(range(len(by_hand)), key=by_hand.__getitem__) == sample["target"])
    assert point.scores[TASK]["acc"] == pytest.approx(sum(correct) / len(correct))


def test_each_point_scores_the_model_at_its_own_routing(task_and_tokenizer) -> None:
    root, tokenizer = task_and_tokenizer
    model = tiny_family("olmoe", vocab_size=len(tokenizer))
    untouched = tiny_family("olmoe", vocab_size=len(tokenizer))
    untouched.load_state_dict(model.state_dict())
    points, results = run_tasks(model, tokenizer, [TASK], [0.3], include_path=root, log_samples=True)
    own, low = points
    assert (own.routing, low.routing) == ("top-2 (the model's own)", "t=0.3")
    check_against_hand(own, results[0], untouched, tokenizer)
    check_against_hand(low, results[1], adaptive(untouched, threshold=0.3), tokenizer)
    # OLMoE's experts: gate, up and down, hidden 32 x intermediate 16; 2 MoE layers
    pair_flops = 2 * 3 * 32 * 16
    assert own.experts_per_token == 2.0 and own.moe_flops_per_token == 2.0 * 2 * pair_flops
    assert 1.0 <= low.experts_per_token < 2.0
    assert low.moe_flops_per_token == pytest.approx(low.experts_per_token * 2 * pair_flops)


def test_an_unknown_task_is_named(task_and_tokenizer) -> None:
    root, tokenizer = task_and_tokenizer
    model = tiny_family("olmoe", vocab_size=len(tokenizer))
    with pytest.raises(UsageError, match="no_such_task.*--include-path"):
        run_tasks(model, tokenizer, ["no_such_task"], [0.5])


def test_a_task_whose_data_cannot_be_downloaded_says_so(task_and_tokenizer, tmp_path, monkeypatch) -> None:
    """Offline, a registry task's data set is a ConnectionError deep inside `datasets`: it is a
    UsageError naming the task and what to do."""
    datasets_config = pytest.importorskip("datasets.config")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)  # fails at once, as with no network
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "remote.yaml").write_text(
        "task: xmoe_remote_task\ndataset_path: xmoe-tests/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    _root, tokenizer = task_and_tokenizer
    model = tiny_family("olmoe", vocab_size=len(tokenizer))
    with pytest.raises(UsageError, match="xmoe_remote_task: the harness could not download.*--include-path"):
        run_tasks(model, tokenizer, ["xmoe_remote_task"], [], include_path=tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--thresholds", "0.5", "0"], "--thresholds 0: threshold must be a number > 0"),  # a traceback after a point
    (["--batch-size", "0"], "--batch-size must be a positive number of sequences, got 0"),  # was accepted
    (["--num-fewshot", "-1"], "--num-fewshot must be 0 or more examples, got -1"),  # was accepted
])
def test_lm_eval_checks_its_flags_before_loading(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--checkpoint", str(tmp_path / "no-model-needed"), "--tasks", TASK, *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_lm_eval_command_on_an_xmoe_export_writes_to_out_not_the_folder(task_and_tokenizer, tmp_path, capsys):
    root, tokenizer = task_and_tokenizer
    moe = MoEConfig(model_dim=32, num_experts=8, expert_dim=16, router="threshold", threshold=0.9, top_k=2)
    gpt = GPTConfig(vocab_size=len(tokenizer), block_size=48, n_layer=2, n_head=2, d_model=32, d_ff=64, moe_every=1,
                    moe=moe)
    folder = tmp_path / "xmoe-folder"
    XMoEForCausalLM(XMoEConfig.from_gpt_config(gpt)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "scores"
    table = run(["lm-eval", "--checkpoint", str(folder), "--tasks", TASK, "--include-path", str(root),
                 "--thresholds", "0.2", "1.0", "--out", str(out)], capsys)
    assert "| t=0.9 (as saved) |" in table and "| t=0.2 |" in table and f"{TASK} acc" in table
    points = json.loads((out / "lm_eval.json").read_text())
    assert [p["threshold"] for p in points] == [None, 0.2, 1.0]
    # t = 1.0 engages every expert: 8 per token; one expert is 2 GeLU matrices of 32 x 16, in 2 MoE layers
    assert points[2]["experts_per_token"] == 8.0 and points[2]["moe_flops_per_token"] == 8 * 2 * (2 * 2 * 32 * 16)
    assert points[1]["experts_per_token"] < points[0]["experts_per_token"] < 8.0
    assert (out / "lm_eval.md").read_text().startswith("| routing |")
    assert not any(p.name.startswith("lm_eval") for p in folder.iterdir())
    assert tf.AutoConfig.from_pretrained(folder).moe_threshold == 0.9  # the folder is untouched


def test_lm_eval_on_the_export_of_a_converted_gpt2(task_and_tokenizer, tmp_path, capsys):
    """`xmoe convert` a GPT-2, `xmoe export-hf` it, `xmoe lm-eval` the folder: an
    XMoEConvertedForCausalLM, which had no moe_layers() (an AttributeError at the first point)."""
    from xmoe.conversion import ConversionConfig, RouterFitConfig
    from xmoe.conversion.hf import convert_hf, save_converted

    root, tokenizer = task_and_tokenizer
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tokenizer), n_positions=48, n_embd=32, n_layer=2,
                                            n_head=2, n_inner=64)).eval()
    convert_hf(gpt2, torch.randint(len(tokenizer), (4, 16)),
               ConversionConfig(num_experts=4, threshold=0.8, router=RouterFitConfig(steps=5)))
    save_converted(gpt2, tmp_path / "converted", tokenizer=tokenizer)
    run(["export-hf", "--checkpoint", str(tmp_path / "converted"), "--out", str(tmp_path / "hf")], capsys)
    run(["lm-eval", "--checkpoint", str(tmp_path / "hf"), "--tasks", TASK, "--include-path", str(root),
         "--thresholds", "1.0", "--out", str(tmp_path / "scores")], capsys)
    at_one = json.loads((tmp_path / "scores" / "lm_eval.json").read_text())[1]
    # t = 1: all 4 experts of width 64 / 4 = 16; GPT-2's FFN is 2 matrices of 32 x 16; 2 layers
    assert at_one["experts_per_token"] == 4.0 and at_one["moe_flops_per_token"] == 4 * 2 * (2 * 2 * 32 * 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_flops_of_every_family(family) -> None:
    """2 FLOPs per multiply-add over gate, up and down projections: 2 x 3 x hidden x expert width."""
    model = tiny_family(family)
    text = model.config.get_text_config()
    width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    assert expert_flops(model) == (text.num_hidden_layers, 2 * 3 * text.hidden_size * width)
