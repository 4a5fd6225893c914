"""The decode benchmark's floor reads exactly the kept experts, its active-weights count is the
model's, and the script runs end to end (tiny shape; the ratios themselves are not asserted)."""

from __future__ import annotations

import argparse
import io

import pytest
import torch

from xmoe.bench import decode as bench
from xmoe.errors import UsageError
from xmoe.models import GPT
from xmoe.presets.gpt import dense, with_moe

TINY = bench.SHAPES["tiny"]


def test_floor_runs_each_kept_expert_once_on_its_own_tokens(monkeypatch) -> None:
    layer = bench.build_layers(TINY, seed=0)["xmoe-soft"]
    x = torch.randn(4, TINY.model_dim, generator=torch.Generator().manual_seed(1))
    kept_TE = layer.route(x).kept_TE
    rows = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda b, a, w: rows.append(a.shape[0]) or real_addmm(b, a, w))
    floor, experts_per_token = bench.active_weights_floor(layer, x)
    floor()
    expected = [n for n in kept_TE.sum(dim=0).tolist() if n]
    assert rows == [n for n in expected for _ in range(2)]  # up and down projection of each kept expert
    assert experts_per_token == kept_TE.sum().item() / 4


def test_gate_floor_reads_the_layers_probabilities() -> None:
    layer = bench.build_layers(TINY, seed=0)["xmoe-sharp"]
    x = torch.randn(3, TINY.model_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rows = bench.gate_floor(layer, x)()
    expected = torch.softmax(x.double() @ layer.router.weight.detach().double().T, dim=-1)
    torch.testing.assert_close(torch.tensor(rows, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_active_params_count_what_a_decoded_token_reads() -> None:
    torch.manual_seed(0)
    plain = GPT(dense("debug"))
    assert bench.active_params(plain, None) == sum(p.numel() for p in plain.parameters()) - plain.wpe.weight.numel()
    moe = GPT(with_moe("debug", "topk", 16))
    experts = sum(p.numel() for layer in moe.moe_layers() for p in layer.experts.parameters())
    every = bench.active_params(moe, 16)
    assert every == sum(p.numel() for p in moe.parameters()) - moe.wpe.weight.numel()
    assert bench.active_params(moe, 2) == every - experts * (1 - 2 / 16)


def test_generation_report_counts_experts_and_tokens() -> None:
    torch.manual_seed(0)
    model = GPT(with_moe("debug", "topk", 16)).eval()
    out = io.StringIO()
    with bench.generation_report(model, 3, out=out):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0)
    assert out.getvalue().startswith("3 new tokens in ")
    assert "tokens/s, 2.00 experts per token (mean over 1 MoE layer)" in out.getvalue()  # top-2 exactly


def test_no_new_tokens_is_refused() -> None:
    """--new-tokens 0 was a ZeroDivisionError after the per-layer timings."""
    args = argparse.Namespace(shapes=["tiny"], tokens=[1], repeats=1, new_tokens=0, no_generate=False, seed=0)
    with pytest.raises(UsageError, match="--new-tokens must be positive"):
        bench.run(args)


@pytest.mark.slow  # about 20 s: the routers' calibration
def test_script_runs_end_to_end(capsys) -> None:
    args = argparse.Namespace(shapes=["tiny"], tokens=[1, 3], repeats=1, new_tokens=2, no_generate=False, seed=0)
    rows = bench.run(args)
    assert [(r["tokens"], r["layer"]) for r in rows["layer"]] == [(t, name) for t in (1, 3) for name, *_ in bench.ROUTERS]
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["floor_gate_ms"] > 0 for r in rows["layer"])
    assert [r["model"] for r in rows["generate"]] == ["dense", *(name for name, *_ in bench.ROUTERS)]
    assert rows["generate"][0]["allowed_speedup"] == 1.0
    assert "| tiny | 1 | top-1 |" in capsys.readouterr().out
