"""The layer benchmark's baselines compute what they claim, and the script runs end to end.

A baseline that computed something else (or less) would make every ratio in
benchmarks/README.md meaningless, so the ones that implement the layer's function are held to
the layer, and the two GEMM-only ones to the kept pairs' row counts.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from xmoe.bench import layer as bench
from xmoe.errors import UsageError

TINY = bench.Shape("tiny", tokens=96, model_dim=16, expert_dim=8, num_experts=8, top_k=2)


def _candidates():
    x = torch.randn(TINY.tokens, TINY.model_dim, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    candidates, ref = bench.make_candidates(TINY, x, target_k=2.5, seed=0, backends=["loop", "fused", "grouped_mm"])
    return candidates, ref, x


def test_baselines_compute_the_layers_function() -> None:
    candidates, ref, x = _candidates()
    with torch.no_grad():
        decision = ref.route(x)
        expected = ref(x).output
        # An independent float64 loop over the kept pairs: sum_e w_te FFN_e(x_t).
        ex = {k: v.double() for k, v in ref.experts.state_dict().items()}
        by_hand = torch.zeros_like(expected, dtype=torch.float64)
        for t, e in decision.kept_TE.nonzero().tolist():
            hidden = torch.nn.functional.gelu(x[t].double() @ ex["w1"][e] + ex["b1"][e])
            by_hand[t] += decision.weights_TE[t, e].double() * (hidden @ ex["w2"][e] + ex["b2"][e])
    assert 1.5 < decision.kept_TE.sum(-1).float().mean() < 3.5  # the router was calibrated
    torch.testing.assert_close(expected.double(), by_hand, rtol=1e-5, atol=1e-6)
    for name in ("xmoe[loop]", "xmoe[fused]", "xmoe[grouped_mm]", "xmoe[static]", "C slots", "mask loop"):
        with torch.no_grad():
            out = candidates[name][0]()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_baselines_run_in_bfloat16() -> None:
    """bf16 is the benchmark's CUDA default: every candidate runs in it (the C-slot baseline once
    added fp32 weights into a bf16 buffer) and the layer-function ones agree to bf16 rounding."""
    x = torch.randn(TINY.tokens, TINY.model_dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    candidates, ref = bench.make_candidates(TINY, x.requires_grad_(True), target_k=2.5, seed=0,
                                            backends=["loop", "grouped_mm"])
    with torch.no_grad():
        expected = ref(x).output.float()
        for name, (fn, _) in candidates.items():
            out = fn()
            if name in ("xmoe[loop]", "xmoe[grouped_mm]", "xmoe[static]", "C slots", "mask loop"):
                assert out.dtype == torch.bfloat16, name
                torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2, msg=lambda m: f"{name}: {m}")


def test_gemm_baselines_do_the_kept_pairs_work() -> None:
    candidates, ref, x = _candidates()
    with torch.no_grad():
        counts = ref.route(x).kept_TE.sum(0).tolist()
        limit = candidates["speed limit"][0]()
        parts = candidates["expert GEMMs"][0]()
    assert limit.shape == (sum(counts), TINY.model_dim)
    assert [p.shape[0] for p in parts] == [n for n in counts if n]


def test_script_prints_a_table(capsys) -> None:
    rows = bench.run(bench_args(["--shapes", "small", "--repeats", "1", "--backends", "fused", "--no-static"]))
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert r["best_backend"] == "fused"
        assert set(r["ms"]) == {"xmoe[fused]", "speed limit", "expert GEMMs", "C slots", "mask loop", "top-8"}
        assert all(ms > 0 for ms in r["ms"].values())
    captured = capsys.readouterr()
    assert "timing fused and the baselines" in captured.err  # progress, on stderr
    table = captured.out
    assert "| small T=1024 D=256 F=128 E=32 | fwd+bwd |" in table and "expert-GEMM fraction" in table


def test_json_rows_go_into_a_new_folder(tmp_path) -> None:
    """--json into a folder that did not exist failed after the timings, losing them."""
    path = tmp_path / "new" / "rows.json"
    rows = bench.run(bench_args(["--shapes", "tiny", "--repeats", "1", "--backends", "loop", "--no-static",
                                 "--json", str(path)]))
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    with pytest.raises(UsageError, match="is a folder"):  # before the timings, not at open() after them
        bench.run(bench_args(["--shapes", "tiny", "--json", str(tmp_path / "new")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="names a GPU this torch does not see")
def test_a_cuda_device_without_a_gpu_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--device cuda: this torch sees no CUDA GPU"):  # was torch's AssertionError
        bench.run(bench_args(["--device", "cuda", "--shapes", "tiny"]))


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),  # 0 was taken for the default, 3
    (["--target-k", "0"], "--target-k must be between 1 and the shapes' experts (8), got 0"),  # settled at 1.02
    (["--target-k", "100"], "--target-k must be between 1 and the shapes' experts (8), got 100"),  # settled at 6.7
])
def test_impossible_settings_are_refused(flags, message) -> None:
    with pytest.raises(UsageError) as refused:
        bench.run(bench_args(["--shapes", "tiny", *flags]))
    assert message in str(refused.value)


def bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)
