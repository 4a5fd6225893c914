"""`xmoe study sharpen`: the pre-declared choice on validation, the bar, and a whole study of a
few steps whose final numbers come from the test split, recomputed here by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.training import cross_entropy_by_hand
from xmoe.cli.main import main
from xmoe.study.sharpen import ARMS, OPTION_ARMS, meets_bar, run_sharpen, select
from xmoe.tasks.lm import eval_batches, load_lm

OVERRIDES = {"train.max_steps": "2", "train.batch_size": "2", "train.seq_len": "16", "train.eval_batches": "2",
             "train.save_every": "0", "data.vocab_size": "300"}


def test_select_prefers_the_best_perplexity_under_half_of_top_k_then_the_cheapest():
    entropy = [a for a in OPTION_ARMS if a.option == "entropy"]
    cheap_but_worse = {entropy[0].name: {"moe_flops_ratio": 0.4, "perplexity": 30.0},
                       entropy[1].name: {"moe_flops_ratio": 0.5, "perplexity": 25.0},
                       entropy[2].name: {"moe_flops_ratio": 0.9, "perplexity": 20.0}}
    assert select(entropy, cheap_but_worse) is entropy[1]  # 0.9x is over the bar, whatever its perplexity
    none_cheap = {a.name: {"moe_flops_ratio": r, "perplexity": 20.0 - r} for a, r in zip(entropy, (0.7, 0.6, 0.8))}
    assert select(entropy, none_cheap) is entropy[1]


def cells(ppl: float, std: float | None, flops: float) -> dict:
    return {"perplexity": {"mean": ppl, "std": std}, "moe_flops_ratio": {"mean": flops, "std": None}}


@pytest.mark.parametrize("row, expected", [((20.5, 0.4), True), ((20.7, 0.49), False), ((19.0, 0.51), False)])
def test_the_bar_is_half_the_flops_at_a_perplexity_within_top_k_spread(row, expected):
    topk = cells(20.0, 0.6, 1.0)
    assert meets_bar(cells(row[0], 0.1, row[1]), topk) is expected


@pytest.fixture(scope="module")
def sharpen(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharpen")
    logs = []
    results = run_sharpen(out=out, data=str(corpus), seeds=2, overrides=OVERRIDES, log=logs.append)
    return out, results, logs


def test_stage_one_trains_every_arm_and_stage_two_the_chosen_ones(sharpen):
    out, results, logs = sharpen
    assert [r["arm"] for r in results["stage1"]] == [a.name for a in ARMS]
    chosen = [r["arm"] for r in results["stage1"] if r["chosen"]]
    assert len(chosen) == 2 and {r["option"] for r in results["stage1"] if r["chosen"]} == {"entropy", "router_lr"}
    assert [r["label"] for r in results["final"]] == ["paper", *chosen, "topk"]
    trained = sorted(p.name for p in (out / "runs").iterdir())
    assert trained == sorted([f"{a.name}-s0" for a in ARMS] + [f"{n}-s1" for n in ("paper", *chosen, "topk")])
    assert (out / "results.md").is_file() and (out / "sharpen.png").is_file()
    assert json.loads((out / "results.json").read_text())["final"][0]["label"] == "paper"


def test_final_perplexity_is_the_test_split_mean_over_seeds(sharpen):
    out, results, _ = sharpen
    row = next(r for r in results["final"] if r["label"] == "paper")
    by_hand = []
    for seed in (0, 1):
        loaded = load_lm(out / "runs" / f"paper-s{seed}", device="cpu")
        batches = list(eval_batches(loaded, None, max_batches=2, split="test"))
        val = next(iter(eval_batches(loaded, None, max_batches=1)))
        assert not torch.equal(batches[0][0], val[0])  # another split
        total, count = cross_entropy_by_hand(loaded.model, batches)
        by_hand.append(math.exp(total / count))
    assert row["perplexity"]["values"] == pytest.approx(by_hand, rel=1e-5)
    assert [s["threshold"] for s in row["sweep"]][-1] == 1.0
    assert row["sweep"][-1]["experts_per_token"]["mean"] == pytest.approx(64.0)  # t = 1: every expert


def test_a_second_call_resumes_without_training(sharpen, corpus):
    out, results, _ = sharpen
    logs = []
    again = run_sharpen(out=out, data=str(corpus), seeds=2, overrides=OVERRIDES, log=logs.append)
    assert all("finished before" in line for line in logs if line.endswith(")") or "finished" in line)
    assert not any("training" in line for line in logs)
    assert again["final"][0]["perplexity"] == results["final"][0]["perplexity"]


def test_cli_plan_lists_every_arm(capsys):
    assert main(["study", "sharpen", "--plan"]) in (None, 0)
    plan = json.loads(capsys.readouterr().out)
    assert list(plan["stage1"]) == [f"{a.name}-s0" for a in ARMS]
    assert plan["stage1"]["entropy-0.1-s0"]["overrides"]["train.entropy_loss_coef"] == "0.1"
    assert plan["stage1"]["topk-s0"]["preset"].startswith("cpu-topk")


def test_cli_plan_takes_steps_and_refuses_overrides_that_undo_the_design(capsys, tmp_path):
    assert main(["study", "sharpen", "--plan", "--steps", "7"]) in (None, 0)
    plan = json.loads(capsys.readouterr().out)
    assert {s["overrides"]["train.max_steps"] for s in plan["stage1"].values()} == {"7"}
    for key in ("train.seed", "train.entropy_loss_coef", "data.test_fraction"):
        with pytest.raises(ValueError, match=key):
            run_sharpen(out=tmp_path, overrides={key: "0.5"})
