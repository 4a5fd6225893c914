"""The study runner on debug models trained a few steps: the tables hold the expected rows, their
numbers match an independent recomputation from the run folders, and a second call resumes."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from helpers.training import cross_entropy_by_hand
from xmoe.cli.main import main
from xmoe.moe import MoELayer
from xmoe.study import MEASUREMENTS, RESULTS_JSON, RESULTS_MD, Runner, plan_study, run_study
from xmoe.study import runner as runner_module
from xmoe.tasks.lm import eval_batches, load_lm

GRANULARITY = ["xmoe-8x256-t0.9", "xmoe-16x128-t0.9", "xmoe-32x64-t0.9", "xmoe-64x32-t0.9"]
STEPS = 2


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "gran"
    logs = []
    results = run_study("granularity", scale="debug", data=str(corpus), out=out, steps=STEPS, log=logs.append)
    return out, results, logs


def test_results_have_the_expected_rows_and_files(study):
    out, results, _ = study
    assert [r["label"] for r in results["granularity"]["rows"]] == GRANULARITY
    assert [(r["num_experts"], r["expert_dim"]) for r in results["granularity"]["rows"]] == [
        (8, 256), (16, 128), (32, 64), (64, 32)]
    assert results["missing_runs"] == [] and json.loads((out / RESULTS_JSON).read_text()) == results
    md = (out / RESULTS_MD).read_text()
    for label in ("8x256", "16x128", "32x64", "64x32"):
        assert f"| {label} | 1 |" in md
    assert set(results["plots"]) == {"granularity.png"} and (out / "granularity.png").stat().st_size > 1000
    run = results["runs"]["xmoe-64x32-t0.9-s0"]
    assert run["steps"] == STEPS and run["config"]["train"]["max_steps"] == STEPS
    assert run["overrides"]["data.path"] == results["data"]


def _experts_by_hand(model, batches, threshold):
    """Experts per token in each MoE layer, from the router's own weights in float64: a token
    takes ranks 1..j of its sorted probabilities while the mass before rank j is < t."""
    inputs = {}
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0]))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for x_BL, _ in batches:
            model(x_BL)
    for h in hooks:
        h.remove()
    counts = []
    for i, layer in enumerate(layers):
        x_TD = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[i]]).double()
        p_TE = torch.softmax(x_TD @ layer.router.weight.double().T, dim=-1)
        sorted_TE = p_TE.sort(dim=-1, descending=True).values
        before_TE = sorted_TE.cumsum(dim=-1) - sorted_TE
        wanted_TE = before_TE < threshold
        wanted_TE[:, 0] = True
        counts.append(wanted_TE.sum(dim=-1).double().mean().item())
    return counts


def test_numbers_match_an_independent_recomputation(study):
    out, results, _ = study
    for name in ("xmoe-16x128-t0.9-s0", "xmoe-64x32-t0.9-s0"):
        row = results["runs"][name]
        loaded = load_lm(out / "runs" / name, device="cpu")
        batches = list(eval_batches(loaded, None, max_batches=loaded.cfg.train.eval_batches))
        total, count = cross_entropy_by_hand(loaded.model, batches)
        assert row["eval_tokens"] == count
        assert row["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
        layers = _experts_by_hand(loaded.model, batches, 0.9)
        assert row["experts_per_token_layers"] == pytest.approx(layers, abs=1e-3)
        moe = loaded.cfg.model.moe
        # GeLU experts: two matrices of D x F, 2 FLOPs per multiply-add, summed over MoE layers.
        by_hand = sum(layers) * 2 * 2 * moe.model_dim * moe.expert_dim
        assert row["moe_flops_per_token"] == pytest.approx(by_hand, rel=1e-3)
        top_k_budget = 1 * moe.top_k * 2 * 2 * moe.model_dim * moe.expert_dim  # one MoE layer in debug
        assert row["moe_flops_ratio"] == pytest.approx(by_hand / top_k_budget, rel=1e-3)
    gran = {r["label"]: r for r in results["granularity"]["rows"]}
    run = results["runs"]["xmoe-16x128-t0.9-s0"]
    assert gran["xmoe-16x128-t0.9"]["perplexity"]["mean"] == run["perplexity"]
    assert gran["xmoe-16x128-t0.9"]["capacity_perplexity"]["mean"] == run["capacity_eval"]["perplexity"]


def test_training_speed_and_drops_come_from_the_run_folder(study):
    out, results, _ = study
    row = results["runs"]["xmoe-32x64-t0.9-s0"]
    rows = [json.loads(line) for line in (out / "runs/xmoe-32x64-t0.9-s0/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    speeds = sorted(r["tokens_per_s"] for r in train[1:])
    assert row["train_tokens_per_s"] == pytest.approx(speeds[len(speeds) // 2] if len(speeds) % 2
                                                      else (speeds[len(speeds) // 2 - 1] + speeds[len(speeds) // 2]) / 2)
    cap = row["capacity_eval"]
    assert cap["dropped_pairs_per_token"] == pytest.approx(sum(cap["dropped_pairs_layers"]) / row["eval_tokens"])
    # With capacity a token keeps no more than it wants (dropless): kept + dropped = wanted.
    for kept, dropped, wanted in zip(cap["experts_per_token_layers"], cap["dropped_pairs_layers"],
                                     row["experts_per_token_layers"]):
        assert kept + dropped / row["eval_tokens"] == pytest.approx(wanted, rel=1e-6)


def test_a_second_call_resumes_without_training(study, monkeypatch, corpus):
    out, results, _ = study
    before = {p.name: p.read_text() for p in (out / "runs").glob(f"*/{MEASUREMENTS}")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner_module, "train_lm", no_training)
    logs = []
    again = run_study("granularity", scale="debug", data=str(corpus), out=out, steps=STEPS, log=logs.append)
    assert sum("finished before, skipped" in line for line in logs) == 4
    assert {p.name: p.read_text() for p in (out / "runs").glob(f"*/{MEASUREMENTS}")} == before
    assert again["granularity"] == results["granularity"]


def test_a_run_interrupted_after_training_is_only_measured(study, monkeypatch, corpus, tmp_path):
    out, results, _ = study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "runs/xmoe-32x64-t0.9-s0" / MEASUREMENTS).unlink()  # as if killed while evaluating
    monkeypatch.setattr(runner_module, "train_lm", lambda *a, **k: pytest.fail("trained again"))
    logs = []
    again = run_study("granularity", scale="debug", data=str(corpus), out=copy, steps=STEPS, log=logs.append)
    assert sum("finished before, skipped" in line for line in logs) == 3
    assert again["runs"]["xmoe-32x64-t0.9-s0"]["perplexity"] == pytest.approx(
        results["runs"]["xmoe-32x64-t0.9-s0"]["perplexity"], rel=1e-6)


def test_a_finished_run_with_another_config_is_refused(study, corpus):
    out, _, _ = study
    logs = []
    with pytest.raises(ValueError, match="holds a run with another config than this study plans"):
        run_study("granularity", scale="debug", data=str(corpus), out=out, steps=STEPS + 1, log=logs.append)
    assert not any("skipped" in line for line in logs)  # it said "finished before, skipped" first


def test_cli_runs_the_study(study, corpus, capsys):
    out, _, _ = study
    main(["study", "granularity", "--scale", "debug", "--data", str(corpus), "--out", str(out),
          "--steps", str(STEPS)])
    printed = capsys.readouterr().out
    assert "4 runs" in printed and str(out / RESULTS_MD) in printed


def test_plan_names_match_the_run_folders(study, corpus):
    out, _, _ = study
    plan = plan_study("granularity", scale="debug", data=str(corpus), steps=STEPS)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r.name for r in plan.runs)


def test_a_config_field_added_since_a_run_finished_takes_its_default(study, corpus, tmp_path):
    out, _, _ = study
    copy = tmp_path / "older"
    shutil.copytree(out, copy)
    path = copy / "runs/xmoe-8x256-t0.9-s0" / MEASUREMENTS
    m = json.loads(path.read_text())
    del m["config"]["train"]["z_loss_coef"]  # as if the run predates the field (default 0.0)
    path.write_text(json.dumps(m))
    run_study("granularity", scale="debug", data=str(corpus), out=copy, steps=STEPS, log=lambda s: None)
    m["config"]["train"]["z_loss_coef"] = 0.5  # a real difference is still refused
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="holds a run with another config than this study plans"):
        run_study("granularity", scale="debug", data=str(corpus), out=copy, steps=STEPS, log=lambda s: None)


def test_the_runner_trains_a_fresh_run_once_and_leaves_a_trained_one(study, corpus, tmp_path):
    """Runner.train: a run with no checkpoint is trained from scratch (resume False); a run
    trained to its last step is left as it is and said so, with the step it found."""
    out, _, _ = study
    spec = plan_study("granularity", scale="debug", data=str(corpus), steps=STEPS).runs[0]
    calls, logs = [], []
    fresh = Runner(tmp_path, trainer=lambda cfg, run_dir, resume: calls.append((cfg, run_dir, resume)),
                   log=logs.append)
    assert fresh.train(spec) is None
    assert [(c.train.max_steps, d, r) for c, d, r in calls] == [(STEPS, tmp_path / spec.name, False)]
    trained = Runner(out / "runs", trainer=lambda *a, **k: pytest.fail("trained again"), log=logs.append)
    assert trained.train(spec) == STEPS
    assert logs == [f"{out / 'runs' / spec.name}: trained before ({STEPS} steps)"]
