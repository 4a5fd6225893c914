"""Means, spreads and "larger than the spread" over seeds, checked against the statistics module
and hand-worked numbers; the main table built from measurement files written here."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from xmoe.study import MEASUREMENTS, exceeds_spread, mean_std, plan_study
from xmoe.study.runner import collect


def test_mean_std_is_the_sample_standard_deviation():
    rng = random.Random(1)
    for n in (2, 3, 7):
        values = [rng.uniform(10, 20) for _ in range(n)]
        got = mean_std(values)
        assert got["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert got["n"] == n and got["values"] == values
    assert mean_std([3.0]) == {"mean": 3.0, "std": None, "n": 1, "values": [3.0]}
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_exceeds_spread_worked_examples():
    a = mean_std([1.0, 2.0, 3.0])  # mean 2, std 1
    assert exceeds_spread(a, mean_std([4.5, 5.0, 5.5])) is True  # |2 - 5| = 3 > 1 + 0.5
    assert exceeds_spread(a, mean_std([2.5, 3.0, 3.5])) is False  # |2 - 3| = 1 < 1.5
    assert exceeds_spread(a, mean_std([9.0])) is None  # one seed: no spread to compare with


def test_main_table_from_measurement_files(tmp_path):
    plan = plan_study("main", scale="debug", seeds=3)
    rng = random.Random(0)
    written: dict[str, list[float]] = {}
    for spec in plan.runs:
        ppl = rng.uniform(100, 120) if "xmoe" not in spec.name else rng.uniform(90, 95)
        written.setdefault(spec.label, []).append(ppl)
        m = {"params": 1000, "perplexity": ppl, "train_tokens_per_s": rng.uniform(1e3, 2e3),
             "inference_tokens_per_s": 5e3, "train_seconds": 1.0}
        if spec.variant.router is not None:
            m.update(experts_per_token=2.0, experts_per_token_layers=[1.0 + spec.seed], moe_flops_per_token=10.0,
                     moe_flops_ratio=1.0)
        run_dir = tmp_path / "runs" / spec.name
        run_dir.mkdir(parents=True)
        (run_dir / MEASUREMENTS).write_text(json.dumps(m))
    results = collect(plan, tmp_path)
    rows = {r["label"]: r for r in results["main"]["rows"]}
    assert list(rows) == list(written) and results["missing_runs"] == []
    for label, values in written.items():
        assert rows[label]["perplexity"]["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert rows[label]["perplexity"]["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
    assert rows["topk-16x128"]["experts_per_token_layers"] == [2.0]  # mean of 1, 2, 3 over seeds
    pairs = {(p["a"], p["b"]): p for p in results["main"]["pairs"]}
    assert len(pairs) == 7 * 6 // 2
    for (a, b), p in pairs.items():
        diff = statistics.mean(written[a]) - statistics.mean(written[b])
        spread = statistics.stdev(written[a]) + statistics.stdev(written[b])
        assert p["difference"] == pytest.approx(diff) and p["exceeds_spread"] == (abs(diff) > spread)
    assert any(p["exceeds_spread"] for p in pairs.values())  # xmoe (90-95) vs the rest (100-120)


def test_unfinished_runs_are_listed_and_left_out(tmp_path):
    plan = plan_study("main", scale="debug", seeds=2)
    spec = plan.runs[0]
    (tmp_path / "runs" / spec.name).mkdir(parents=True)
    (tmp_path / "runs" / spec.name / MEASUREMENTS).write_text(json.dumps(
        {"params": 1, "perplexity": 50.0, "train_tokens_per_s": 1.0, "inference_tokens_per_s": 1.0,
         "train_seconds": 1.0}))
    results = collect(plan, tmp_path)
    assert [r["label"] for r in results["main"]["rows"]] == ["dense"]
    assert results["main"]["rows"][0]["perplexity"]["std"] is None
    assert len(results["missing_runs"]) == len(plan.runs) - 1
