"""The training loop, configs and checkpoints, on a tiny model and text made here."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.data import write_corpus
from helpers.training import cross_entropy_by_hand, tiny_lm_config
import xmoe
from xmoe import UsageError
from xmoe.cli.main import config_overrides
from xmoe.cli.main import build_parser, main
from xmoe.models.gpt import GPT
from xmoe.training import (
    CheckpointError,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    to_dict,
)
from xmoe.tasks.lm import LMRunConfig, eval_batches, evaluate_lm, lm_run_config, load_lm, train_lm
from xmoe.tasks import lm as lm_module


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


tiny_config = tiny_lm_config


def test_overrides_set_nested_fields_and_revalidate(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path)
    out = apply_overrides(cfg, {"model.moe.threshold": "0.7", "train.betas": "[0.8, 0.9]",
                                "model.moe.capacity_factor": "none", "train.compile": "false"})
    assert out.model.moe.threshold == 0.7
    assert out.train.betas == (0.8, 0.9)
    assert out.model.moe.capacity_factor is None
    assert cfg.model.moe.threshold == 0.9  # the original is untouched
    # d_model carries moe.model_dim along, so the pair stays consistent
    assert apply_overrides(cfg, {"model.d_model": "32"}).model.moe.model_dim == 32


@pytest.mark.parametrize("key, value, message", [
    ("model.moe.treshold", "0.5", "did you mean 'model.moe.threshold'"),
    ("train.max_steps", "many", "'train.max_steps': expected int, got many"),
    ("model.moe.threshold", "-1", "threshold must be a number > 0"),
    ("train", "3", "is a section"),
    ("train.betas", "0.9", r"'train.betas': expected tuple, got 0.9 \(write a tuple as a JSON list"),
    ("train.warmup_steps", "few", r"expected int, got few \(or null for None\)"),
    ("model.moe.capacity_factor", "x", "'model.moe.capacity_factor': expected float, got x"),
    ("train.lr", "-1", "train.lr must be a positive finite number"),
])
def test_bad_overrides_name_the_key(corpus, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(tiny_config(corpus, tmp_path), {key: value})


def test_override_flags_take_either_form_and_old_spellings_name_the_new(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "run"), "--train.max_steps=2", "--model.moe.threshold", "0.7"]
    args, rest = build_parser().parse_known_args(argv)
    assert rest == [] and config_overrides(args) == {"train.max_steps": "2", "model.moe.threshold": "0.7"}
    for old, new in ((["train", "--data", "x.txt"], "--data is now --data.path"),
                     (["train-mt", "--src", "a.en"], "--src is now --data.src")):
        with pytest.raises(SystemExit):
            main([*old, "--out", str(tmp_path / "run")])
        assert f"error: {new}: write" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_json_round_trip(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path)
    assert from_dict(LMRunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_a_run_config_names_its_task_and_old_folders_are_told_apart_by_decode():
    """config.json says which task a run is; a folder saved before it said so is a translation
    run when it has decoding settings (only translation has them)."""
    from xmoe.training.runs import task_of

    assert to_dict(lm_run_config("debug-xmoe"))["task"] == "lm"
    assert task_of({"task": "mt", "preset": "debug-xmoe"}) == "mt"
    assert task_of({"preset": "debug-xmoe-mt", "decode": {"beam": 4}}) == "mt"
    assert task_of({"preset": "debug-xmoe", "model": {}}) == "lm"
    with pytest.raises(ValueError, match="task 'lm'"):
        from_dict(LMRunConfig, {**to_dict(lm_run_config("debug-xmoe")), "task": "mt"})


def test_training_lowers_the_loss_and_logs(corpus, tmp_path):
    result = train_lm(tiny_config(corpus, tmp_path, max_steps=30, save_every=0), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["task"] == "lm"
    assert result.steps == 30 and not result.interrupted
    assert sum(result.train_losses[-5:]) / 5 < sum(result.train_losses[:5]) / 5 - 0.3
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 31))
    final = rows[-1]
    assert final["split"] == "val" and final["perplexity"] == pytest.approx(2.718281828 ** final["loss"], rel=1e-6)
    assert len(final["layers"]) == 1 and sum(final["layers"][0]["experts_histogram"]) == final["tokens"]


@pytest.mark.parametrize("overrides", [{}, {"model.moe.target_experts": "2"}], ids=["fixed-t", "budget"])
def test_resume_continues_exactly(corpus, tmp_path, monkeypatch, overrides):
    """A budgeted router's t and controller state are restored too: the losses depend on them."""
    cfg = tiny_config(corpus, tmp_path, overrides)
    whole = train_lm(cfg, tmp_path / "whole", progress=False)

    original = lm_module.LanguageModelling.train_batch

    def interrupt_at_step_4(self, index):
        if index == 4:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(lm_module.LanguageModelling, "train_batch", interrupt_at_step_4)
    first = train_lm(cfg, tmp_path / "split", progress=False)
    assert first.interrupted and first.steps == 4
    monkeypatch.setattr(lm_module.LanguageModelling, "train_batch", original)
    second = train_lm(cfg, tmp_path / "split", resume=True, progress=False)

    assert first.train_losses + second.train_losses == whole.train_losses  # bit for bit
    a, b = load_lm(tmp_path / "whole").model, load_lm(tmp_path / "split").model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    split_rows = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["split"] == "train"]
    assert split_rows == list(range(1, 7))  # no step logged twice across the resume
    if overrides:  # the controller moved t away from its start, the same way in both runs
        ts = [layer.threshold for layer in b.moe_layers()]
        assert ts == [layer.threshold for layer in a.moe_layers()] and all(t != 0.9 for t in ts)


def test_evaluating_during_training_changes_nothing_in_training(corpus, tmp_path):
    """Validation every 2 steps leaves the training steps as they are without it: after an
    evaluation the model trains in training mode again (dropout on, the budget's t moving)."""
    budget = {"model.moe.target_experts": "2"}
    quiet = train_lm(tiny_config(corpus, tmp_path, budget), tmp_path / "quiet", progress=False)
    checked = train_lm(tiny_config(corpus, tmp_path, budget, eval_every=2), tmp_path / "checked", progress=False)
    assert checked.train_losses == quiet.train_losses  # bit for bit
    a, b = load_lm(tmp_path / "quiet").model, load_lm(tmp_path / "checked").model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    vals = [r["step"] for r in read_metrics(tmp_path / "checked" / "metrics.jsonl") if r["split"] == "val"]
    assert vals == [2, 4, 6]  # it did evaluate in between (and at the end)


def test_fresh_training_refuses_to_overwrite_a_run(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, max_steps=1)
    train_lm(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_lm(cfg, tmp_path / "run", progress=False)


def _tiny_model(seed=0, **overrides):
    cfg = lm_run_config("debug-xmoe", overrides=overrides).model
    torch.manual_seed(seed)
    return GPT(cfg)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = _tiny_model().eval()
    save_checkpoint(tmp_path, model=model, optimizer=None, step=7, config={"x": 1})
    other = _tiny_model(seed=1).eval()
    assert load_checkpoint(tmp_path, other)["step"] == 7
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    assert torch.equal(model(idx).logits_BLV, other(idx).logits_BLV)


def test_corrupted_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    model = _tiny_model()
    save_checkpoint(tmp_path, model=model, optimizer=None, step=1, config={})
    with pytest.raises(CheckpointError, match="does not match this model"):
        load_checkpoint(tmp_path, _tiny_model(**{"model.d_model": "32"}))
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path, model)
    (tmp_path / "checkpoint" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path, model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", model)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _tiny_model()
    save_checkpoint(tmp_path, model=model, optimizer=None, step=1, config={})
    import xmoe.training.checkpoint as ckpt

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model=model, optimizer=None, step=2, config={})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, _tiny_model())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary left behind


def run_cli(*args, cwd):
    """``python -m xmoe ARGS`` in ``cwd``, importing the xmoe this test imported (not whichever a
    relative PYTHONPATH or an install elsewhere would give in another folder)."""
    src = str(Path(xmoe.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "xmoe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_end_to_end(corpus, tmp_path):
    run = tmp_path / "run"
    common = ["--train.batch_size=4", "--train.seq_len=32", "--train.eval_batches=2",
              f"--data.cache_dir={tmp_path / 'cache'}", "--data.vocab_size=300"]
    r = run_cli("train", "--preset", "debug-xmoe", f"--data.path={corpus}", "--out", str(run),
                "--train.max_steps=8", "--train.log_every=2", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "experts per token" in r.stdout
    assert (run / "report" / "loss.png").is_file()

    r = run_cli("eval", "--checkpoint", str(run), "--threshold", "0.5", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["experts_per_token"] >= 1

    r = run_cli("eval", "--checkpoint", str(run), "--data", str(corpus), "--max-batches", "2", cwd=tmp_path)
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr

    r = run_cli("sweep-threshold", "--checkpoint", str(run), "--thresholds", "0.5", "1.0", "--max-batches", "2",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "report" / "threshold_sweep.png").is_file()

    r = run_cli("generate", "--checkpoint", str(run), "--prompt", "the quick", "--max-new-tokens", "5",
                cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("the quick"), r.stderr
    assert re.search(r"5 new tokens in [\d.]+ s: [\d.]+ tokens/s, [\d.]+ experts per token", r.stderr), r.stderr

    r = run_cli("train", "--out", str(run), "--resume", "--train.max_steps=10", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 10


@pytest.mark.parametrize("args, message", [
    (["eval", "--checkpoint", "missing"], "does not exist"),
    (["train", "--out", "x", "--train.max_stepz=3"], "did you mean 'train.max_steps'"),
    (["train", "--out", "x", "--data.path=no-such-file.txt"], "no-such-file.txt"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_interrupt_during_evaluation_saves_the_completed_step(corpus, tmp_path, monkeypatch):
    """Ctrl-C after an optimizer step (here, in the evaluation after step 2) must checkpoint
    step 2, not 1: the weights already hold step 2's update."""
    cfg = tiny_config(corpus, tmp_path, eval_every=2, save_every=0)

    def interrupted_eval(self, model, ranks):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_module.LanguageModelling, "evaluate", interrupted_eval)
    result = train_lm(cfg, tmp_path / "run", progress=False)
    assert result.interrupted and result.steps == 2
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_non_finite_loss_stops_the_run_before_saving(corpus, tmp_path, monkeypatch):
    cfg = tiny_config(corpus, tmp_path, max_steps=4, save_every=1)
    original = lm_module.LanguageModelling.loss

    def nan_at_step_3(self, model, batch):
        loss, logs = original(self, model, batch)
        if self.batches_seen == 2:
            loss = loss * float("nan")
            logs["loss"] = loss.detach()
        self.batches_seen += 1
        return loss, logs

    monkeypatch.setattr(lm_module.LanguageModelling, "batches_seen", 0, raising=False)
    monkeypatch.setattr(lm_module.LanguageModelling, "loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="nothing was saved"):
        train_lm(cfg, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    weights = load_lm(tmp_path / "run").model.state_dict()
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_resume_refuses_changes_that_break_exactness(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, max_steps=2)
    train_lm(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="train.batch_size"):
        train_lm(apply_overrides(cfg, {"train.batch_size": "8", "train.max_steps": "4"}), tmp_path / "run",
                 resume=True, progress=False)
    with pytest.raises(ValueError, match="already at step 2"):
        train_lm(cfg, tmp_path / "run", resume=True, progress=False)
    (corpus).write_text(corpus.read_text() + "\nnew text changes the batches")
    with pytest.raises(ValueError, match="changed since"):
        train_lm(apply_overrides(cfg, {"train.max_steps": "4"}), tmp_path / "run", resume=True, progress=False)


def test_bad_device_and_flag_without_value_are_clear(capsys):
    from xmoe.training.loop import resolve_device

    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--train.compile", "--train.lr=1"])
    assert "argument --train.compile: expected one argument" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="names a GPU this torch does not see")
def test_a_training_device_without_a_gpu_names_the_train_flag(corpus, tmp_path):
    """The run's device is --train.device; the message told a user of `xmoe train` to use --device."""
    cfg = tiny_lm_config(corpus, tmp_path, device="cuda")
    with pytest.raises(UsageError, match=r"--train.device=cuda: this torch sees no CUDA GPU; use --train.device=cpu"):
        train_lm(cfg, tmp_path / "run", progress=False)


def test_a_run_trained_on_a_relative_path_is_evaluated_from_another_folder(corpus, tmp_path, monkeypatch, capsys):
    """--data.path=corpus.txt was saved as given, so `xmoe eval` (which re-reads the run's
    validation split) and --resume failed in any other folder: "data path 'corpus.txt' does not exist"."""
    from helpers.cli import TINY_TRAIN

    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(corpus, here / "corpus.txt")
    monkeypatch.chdir(here)
    main(["train", "--preset", "debug-xmoe", "--out", str(tmp_path / "run"), "--data.path=corpus.txt", *TINY_TRAIN,
          f"--data.cache_dir={tmp_path / 'cache'}"])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main(["eval", "--checkpoint", str(tmp_path / "run"), "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert load_lm(tmp_path / "run").cfg.data.path == str(here / "corpus.txt")
    monkeypatch.chdir(here)  # --resume with the same relative flag is the same run
    main(["train", "--out", str(tmp_path / "run"), "--data.path=corpus.txt", *TINY_TRAIN, "--train.max_steps=4",
          f"--data.cache_dir={tmp_path / 'cache'}", "--resume"])
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 4


@pytest.mark.parametrize("given, saved", [("corpus.txt", "{here}/corpus.txt"), ('"corpus.txt"', "{here}/corpus.txt"),
                                          ("~/corpus.txt", "{home}/corpus.txt"), ("/abs/corpus.txt", "/abs/corpus.txt"),
                                          ("none", None), ("None", None), ("null", None)])
def test_a_data_path_is_saved_absolute_as_the_parser_reads_it(given, saved, tmp_path, monkeypatch):
    """Unquoted, ~ expanded (no shell does it after --data.path=), and none / null for the default corpus."""
    from xmoe.tasks.lm import LanguageModelling
    from xmoe.training.runs import run_config

    monkeypatch.chdir(tmp_path)
    expected = None if saved is None else saved.format(here=tmp_path, home=os.path.expanduser("~"))
    assert run_config(LanguageModelling, "debug-xmoe", {"data.path": given}).data.path == expected


def test_lr_at_with_fixed_warmup_steps_and_with_warmup_fraction():
    """Hand-computed: inverse sqrt with 512 warm-up steps (lr (s+1)/512, then lr sqrt(512/(s+1)));
    warmup_steps overrides warmup_fraction; without it the fraction of max_steps is used."""
    from xmoe.training.loop import lr_at

    fixed = TrainConfig(lr=1e-3, max_steps=1000, schedule="inverse_sqrt", warmup_fraction=0.1, warmup_steps=512)
    for step, lr in ((0, 1e-3 / 512), (255, 5e-4), (511, 1e-3), (2047, 5e-4), (8191, 2.5e-4)):
        assert lr_at(step, fixed) == pytest.approx(lr, rel=1e-12), step
    fraction = TrainConfig(lr=1e-3, max_steps=1000, schedule="inverse_sqrt", warmup_fraction=0.1)
    for step, lr in ((0, 1e-5), (99, 1e-3), (399, 5e-4)):  # 100 warm-up steps
        assert lr_at(step, fraction) == pytest.approx(lr, rel=1e-12), step
    none = TrainConfig(lr=1e-3, max_steps=1000, schedule="inverse_sqrt", warmup_steps=0)
    assert (lr_at(0, none), lr_at(3, none)) == pytest.approx((1e-3, 5e-4), rel=1e-12)
    cosine = TrainConfig(lr=1e-3, max_steps=100, min_lr_ratio=0.0, warmup_steps=20)
    assert (lr_at(9, cosine), lr_at(60, cosine)) == pytest.approx((5e-4, 5e-4), rel=1e-12)  # mid-decay at 60
    assert TrainConfig().warmup_steps is None  # the LM recipe keeps its 10% warm-up
    assert apply_overrides(fixed, {"warmup_steps": "null"}).warmup_steps is None


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_warmup_steps_is_a_clear_error(value):
    with pytest.raises(ValueError, match="train.warmup_steps"):
        TrainConfig(warmup_steps=value)


def matched_k_by_hand(experts: float) -> list[int]:
    """Top-k at XMoE's compute: the integer within 0.05, else the integers on either side."""
    for k in range(1, 65):
        if abs(experts - k) <= 0.05:
            return [k]
    return [int(experts), int(experts) + 1]


def small_demo(cli, monkeypatch, tmp_path):
    from xmoe.study import demo

    monkeypatch.setattr(demo, "DEMO_TRAIN", {
        **demo.DEMO_TRAIN, "train.batch_size": "4", "train.seq_len": "32", "train.eval_batches": "2",
        "data.vocab_size": "300", "data.cache_dir": str(tmp_path / "cache")})
    monkeypatch.setattr(demo, "SPEED_BATCHES", 1)


@pytest.mark.parametrize("paper", [False, True])
def test_demo_trains_xmoe_and_the_compute_matched_top_k_on_the_same_tokens(corpus, tmp_path, monkeypatch, capsys,
                                                                           paper):
    """`xmoe demo` (the README's main job) at toy size: XMoE (with a compute budget unless
    --paper-recipe), then top-k at the experts per token XMoE measured, the compute dial, and the
    closing table, whose perplexities are recomputed here from float64 logits."""
    from xmoe.cli import main as cli
    from xmoe.models.gpt import num_params

    small_demo(cli, monkeypatch, tmp_path)
    out = tmp_path / "demo"
    cli.main(["demo", "--steps", "2", "--preset", "debug-xmoe", "--data", str(corpus), "--out", str(out)]
             + (["--paper-recipe"] if paper else []))
    printed = capsys.readouterr().out
    xmoe = load_lm(out / "xmoe")
    from xmoe.study.demo import DEMO_BUDGET

    assert xmoe.cfg.model.moe.target_experts == (None if paper else DEMO_BUDGET)
    batches = list(eval_batches(xmoe, None, max_batches=2))
    experts = evaluate_lm(xmoe.model, batches).to_dict()["experts_per_token"]
    ks = matched_k_by_hand(experts)
    assert sorted(p.name for p in out.iterdir()) == sorted(["xmoe", *(f"top{k}" for k in ks)])
    closing = printed[printed.index("XMoE against top-k at the same compute"):]
    for k in ks:
        topk = load_lm(out / f"top{k}")
        assert topk.cfg.model.moe.router == "topk" and topk.cfg.model.moe.top_k == k
        assert num_params(xmoe.model) == num_params(topk.model)
        assert (out / "xmoe" / "tokenizer.json").read_bytes() == (out / f"top{k}" / "tokenizer.json").read_bytes()
        assert json.loads((out / f"top{k}" / "checkpoint" / "state.json").read_text())["step"] == 2
        total, count = cross_entropy_by_hand(topk.model, batches)
        assert f"| top-{k} | {math.exp(total / count):.2f} | {k:.2f} |" in closing
        assert f"Against top-{k}: XMoE's perplexity is" in closing
    assert (out / "xmoe" / "report" / "threshold_sweep.png").is_file()
    assert ("the paper's recipe" in printed) == paper and ("compute budget" in printed) != paper
    total, count = cross_entropy_by_hand(xmoe.model, batches)
    assert f"| {math.exp(total / count):.2f} | {experts:.2f} |" in closing.splitlines()[4]


def test_the_demo_compares_a_budgeted_xmoe_at_its_trained_t_after_the_dial(corpus, tmp_path, monkeypatch, capsys):
    """The dial sweeps t over 0.5 .. 1.0; the closing table must be XMoE at the t training left
    (per layer), not at the last t of the sweep or the config's starting t."""
    from xmoe.cli import main as cli

    small_demo(cli, monkeypatch, tmp_path)
    cli.main(["demo", "--steps", "2", "--preset", "debug-xmoe", "--data", str(corpus), "--out", str(tmp_path / "d")])
    closing = capsys.readouterr().out.split("XMoE against top-k at the same compute")[1]
    xmoe = load_lm(tmp_path / "d" / "xmoe")
    trained = [layer.threshold for layer in xmoe.model.moe_layers()]
    assert all(t not in (0.5, 0.7, 0.9, 1.0) for t in trained)
    assert f"t trained to {sum(trained) / len(trained):.3f}" in closing
    total, count = cross_entropy_by_hand(xmoe.model, list(eval_batches(xmoe, None, max_batches=2)))
    assert f"| {math.exp(total / count):.2f} |" in closing.splitlines()[4]


@pytest.mark.parametrize("demo_seq_len", [None, 48])
def test_the_demo_trains_a_preset_of_short_context_at_its_context(corpus, tmp_path, monkeypatch, capsys,
                                                                  demo_seq_len):
    """`xmoe demo --preset debug-xmoe`: the demo's 128-token sequences are cut to the preset's
    64-token context (they were refused: seq_len exceeds block_size, with no flag to fix it); a
    demo length under the context (48) is kept."""
    from xmoe.cli import main as cli
    from xmoe.presets import get_preset
    from xmoe.study import demo

    small_demo(cli, monkeypatch, tmp_path)
    monkeypatch.setattr(demo, "DEMO_TRAIN", {k: v for k, v in demo.DEMO_TRAIN.items() if k != "train.seq_len"})
    if demo_seq_len is not None:
        monkeypatch.setattr(demo, "DEMO_SEQ_LEN", demo_seq_len)
    context = get_preset("debug-xmoe").block_size
    assert demo_seq_len or context < demo.DEMO_SEQ_LEN
    cli.main(["demo", "--steps", "1", "--preset", "debug-xmoe", "--data", str(corpus), "--out", str(tmp_path / "d")])
    for run in (tmp_path / "d").iterdir():
        assert load_lm(run).cfg.train.seq_len == (demo_seq_len or context)


def test_a_demo_resumed_with_other_flags_is_refused_and_a_top_k_preset_named(corpus, tmp_path, monkeypatch, capsys):
    """`xmoe demo --resume` without the flags the demo started with planned other runs and took
    the trained ones as its own ("trained before (1 steps)", "64 experts" of another preset);
    a top-k preset was refused for its target_experts instead of as no XMoE preset."""
    from xmoe.cli import main as cli

    small_demo(cli, monkeypatch, tmp_path)
    argv = ["demo", "--preset", "debug-xmoe", "--data", str(corpus), "--out", str(tmp_path / "d")]
    cli.main([*argv, "--steps", "2"])
    capsys.readouterr()
    top_k = ["demo", "--preset", "debug-topk", "--out", str(tmp_path / "t")]
    for again in ([*argv, "--steps", "1", "--resume"], top_k):
        with pytest.raises(SystemExit) as refused:
            cli.main(again)
        assert refused.value.code == 2
    first, second = capsys.readouterr().err.strip().splitlines()[-2:]
    assert "d/xmoe holds a run with another config than this demo plans (other --preset, --steps" in first
    assert "--preset debug-topk is not an XMoE preset" in second


def test_a_demo_is_refused_twice_and_continues_with_resume(corpus, tmp_path, monkeypatch, capsys):
    """A second `xmoe demo` on the same --out names --resume; --resume trains only what is
    missing (here a top-k model) and closes with every model."""
    from xmoe.cli import main as cli

    small_demo(cli, monkeypatch, tmp_path)
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--preset", "debug-xmoe", "--data", str(corpus), "--out", str(out)]
    cli.main(argv)
    xmoe_weights = (out / "xmoe" / "checkpoint" / "model.safetensors").read_bytes()
    baseline = next(p for p in out.iterdir() if p.name.startswith("top"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    assert refused.value.code == 2 and "continue it with --resume" in capsys.readouterr().err
    shutil.rmtree(baseline)
    cli.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert f"{out / 'xmoe'}: trained before (2 steps)" in printed
    assert (out / "xmoe" / "checkpoint" / "model.safetensors").read_bytes() == xmoe_weights
    assert json.loads((baseline / "checkpoint" / "state.json").read_text())["step"] == 2
    assert f"| top-{baseline.name[3:]} |" in printed[printed.index("XMoE against top-k"):]


@pytest.mark.parametrize("error, one_line", [(UsageError("--x is wrong; use --y"), True), (ValueError("a bug"), False)])
def test_main_prints_user_errors_as_one_line_and_lets_bugs_raise(monkeypatch, capsys, error, one_line):
    from xmoe.cli import main as cli

    def fail():
        raise error

    monkeypatch.setitem(cli.COMMANDS, "presets", cli.Command(fail))
    if one_line:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["presets"])
        assert exit_.value.code == 2 and capsys.readouterr().err == "xmoe presets: error: --x is wrong; use --y\n"
    else:
        with pytest.raises(ValueError, match="a bug"):
            cli.main(["presets"])
