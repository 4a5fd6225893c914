"""`xmoe study budget`: Spearman's rho and the bar against plain definitions, and a study of a
few steps whose test numbers (perplexity, each token's experts, t) are recomputed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.training import cross_entropy_by_hand
from xmoe import UsageError
from xmoe.cli.main import main
from xmoe.study.budget import ARMS, difficulty, run_budget, spearman, versus
from xmoe.tasks.lm import eval_batches, load_lm

OVERRIDES = {"train.max_steps": "3", "train.batch_size": "2", "train.seq_len": "16", "train.eval_batches": "2",
             "train.save_every": "0", "data.vocab_size": "300"}
SMALL = tuple(a for a in ARMS if a.name in ("budget-1.5", "top1", "top2", "paper"))


def ranks_by_hand(values: list[float]) -> list[float]:
    """1-based ranks; equal values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_spearman_is_pearson_of_tie_averaged_ranks():
    gen = torch.Generator().manual_seed(0)
    experts = torch.randint(1, 5, (200,), generator=gen)  # many ties, as expert counts have
    loss = torch.rand(200, generator=gen, dtype=torch.float64) + 0.1 * experts
    expected = pearson(ranks_by_hand(experts.tolist()), ranks_by_hand(loss.tolist()))
    assert spearman(experts, loss) == pytest.approx(expected, rel=1e-12)
    assert spearman(loss, -loss) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(10), loss[:10]))  # top-1: one expert for every token


def row(ppl: float, std: float | None, experts: float) -> dict:
    return {"perplexity": {"mean": ppl, "std": std}, "experts_per_token": {"mean": experts, "std": None}}


def test_the_bar_is_beating_the_top_k_at_or_above_the_measured_compute_beyond_the_spread():
    topk = {1.0: row(30.0, 0.3, 1.0), 2.0: row(29.0, 0.3, 2.0), 4.0: row(28.5, 0.3, 4.0)}
    v = versus(row(28.0, 0.2, 1.7), topk)  # between top-1 and top-2: matched against both
    assert (v["below"]["k"], v["above"]["k"]) == (1.0, 2.0)
    assert v["above"]["difference"] == pytest.approx(-1.0) and v["meets_bar"] is True
    assert versus(row(28.6, 0.2, 1.7), topk)["meets_bar"] is False  # 28.8 is not below 28.7
    for experts in (2.0, 2.03, 1.96):  # within 0.05 of 2 experts: top-2 is below and above
        near = versus(row(28.0, 0.2, experts), topk)
        assert near["below"]["k"] == near["above"]["k"] == 2.0
    worse = versus(row(31.0, 0.1, 4.5), topk)  # more compute than any top-k: nothing above
    assert "above" not in worse and "meets_bar" not in worse and worse["below"]["worse_beyond_spread"]


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    logs = []
    results = run_budget(out=out, data=str(corpus), seeds=2, overrides=OVERRIDES, arms=SMALL, log=logs.append)
    return out, results, logs


def test_core_arms_train_before_references_and_every_output_is_written(study):
    out, results, logs = study
    trained = [line.split(":")[0] for line in logs if "training" in line]
    assert trained == ["budget-1.5-s0", "top1-s0", "top2-s0", "budget-1.5-s1", "top1-s1", "top2-s1",
                       "paper-s0", "paper-s1"]
    assert [r["label"] for r in results["arms"]] == [a.name for a in SMALL]
    assert (out / "results.md").is_file() and (out / "budget.png").is_file()
    speeds = json.loads((out / "speeds.json").read_text())
    assert set(speeds) == {a.name for a in SMALL}
    assert all(s["train_tokens_per_s"] > 0 and s["inference_tokens_per_s"] > 0 for s in speeds.values())


def test_test_numbers_are_the_whole_test_split_recomputed_by_hand(study):
    """Perplexity from float64 logits over every test batch, and each token's experts from the
    router weights, its input and the trained t by the rule written out here."""
    out, results, _ = study
    budget = next(r for r in results["arms"] if r["label"] == "budget-1.5")
    perplexities, experts = [], []
    for seed in (0, 1):
        loaded = load_lm(out / "runs" / f"budget-1.5-s{seed}", device="cpu")
        batches = list(eval_batches(loaded, None, split="test"))
        assert len(batches) > int(OVERRIDES["train.eval_batches"])  # the whole split, not the eval batches
        total, count = cross_entropy_by_hand(loaded.model, batches)
        perplexities.append(math.exp(total / count))
        experts.append(experts_by_hand(loaded.model, batches))
    assert budget["perplexity"]["values"] == pytest.approx(perplexities, rel=1e-5)
    assert budget["experts_per_token"]["values"] == pytest.approx(experts, abs=1e-3)
    thresholds = [sum(m.threshold for m in load_lm(out / "runs" / f"budget-1.5-s{s}").model.moe_layers()) / 2
                  for s in (0, 1)]
    assert budget["final_threshold"]["values"] == pytest.approx(thresholds, rel=1e-9)
    assert all(t != 0.9 for t in thresholds)  # the controller moved t


def experts_by_hand(model, batches) -> float:
    """Mean over MoE layers of the experts per token, by the threshold rule in float64 on each
    layer's input (captured by a hook); a token within 1e-6 of a boundary fails the test (its
    fp32 and float64 decisions could differ)."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, []).append(args[0]))
             for i, layer in enumerate(model.moe_layers())]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    per_layer = []
    for i, layer in enumerate(model.moe_layers()):
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs[i]]).double()
        probs = (x @ layer.router.weight.double().T).softmax(dim=-1)
        counts = []
        for p in probs.tolist():
            p = sorted(p, reverse=True)
            taken, mass = 0, 0.0
            while taken < len(p) and (taken == 0 or mass < layer.threshold):
                assert taken == 0 or abs(mass - layer.threshold) > 1e-6, "a token on the boundary"
                mass += p[taken]
                taken += 1
            counts.append(taken)
        per_layer.append(sum(counts) / len(counts))
    return sum(per_layer) / len(per_layer)


def test_difficulty_pairs_a_budget_with_the_top_k_at_or_above_its_experts(study):
    _, results, _ = study
    for budget in (r for r in results["arms"] if r["router"] == "threshold"):
        above = [k for k in (1, 2) if k >= budget["experts_per_token"]["mean"]]
        assert budget["difficulty"]["matched"] == (f"top{min(above)}" if above else None)
        assert len(budget["difficulty"]["layers"]) == 2
        for layer in budget["difficulty"]["layers"]:
            assert sum(layer["histogram"]) > 0 and ("rho_topk_loss" in layer) == bool(above)


def test_difficulty_correlates_each_layer_with_both_losses():
    gen = torch.Generator().manual_seed(1)
    own = {"loss_N": torch.rand(50, generator=gen), "experts_LN": torch.randint(1, 4, (2, 50), generator=gen)}
    matched = {"loss_N": torch.rand(50, generator=gen)}
    result = difficulty(own, matched)
    for layer, experts in zip(result["layers"], own["experts_LN"]):
        assert layer["rho_own_loss"] == pytest.approx(pearson(ranks_by_hand(experts.tolist()),
                                                              ranks_by_hand(own["loss_N"].tolist())))
        assert layer["rho_topk_loss"] == pytest.approx(pearson(ranks_by_hand(experts.tolist()),
                                                               ranks_by_hand(matched["loss_N"].tolist())))
        assert layer["histogram"] == [int((experts == k).sum()) for k in range(int(experts.max()) + 1)]


def test_a_second_call_resumes_and_tabulate_trains_nothing(study, corpus, capsys):
    out, results, _ = study
    logs = []
    again = run_budget(out=out, data=str(corpus), seeds=2, overrides=OVERRIDES, arms=SMALL, log=logs.append)
    assert not any("training" in line for line in logs)
    assert again["arms"][0]["perplexity"] == results["arms"][0]["perplexity"]
    again = run_budget(out=out, data=str(corpus), seeds=2, overrides=OVERRIDES, arms=SMALL, train=False,
                       log=logs.append)
    assert again["arms"][0]["perplexity"] == results["arms"][0]["perplexity"]


def test_tabulate_before_any_run_says_what_to_do(tmp_path, corpus):
    with pytest.raises(UsageError, match="no finished run"):
        run_budget(out=tmp_path, data=str(corpus), seeds=2, overrides=OVERRIDES, train=False)


def test_cli_plan_lists_every_arm_and_refuses_overrides_that_undo_the_design(capsys):
    assert main(["study", "budget", "--plan", "--steps", "7"]) in (None, 0)
    plan = json.loads(capsys.readouterr().out)["seed0"]
    assert list(plan) == [f"{a.name}-s0" for a in ARMS]
    assert plan["budget-1.5-s0"]["overrides"]["model.moe.target_experts"] == "1.5"
    assert plan["top4-s0"]["overrides"]["model.moe.top_k"] == "4" and plan["top4-s0"]["preset"].startswith("cpu-topk")
    assert {s["overrides"]["train.max_steps"] for s in plan.values()} == {"7"}
    for args, words in ((["budget", "--plan", "--model.moe.top_k=3"], "sets model.moe.top_k itself"),
                        (["main", "--tabulate"], "--tabulate belongs to xmoe study budget")):
        with pytest.raises(SystemExit) as stop:
            main(["study", *args])
        assert stop.value.code == 2 and words in capsys.readouterr().err
