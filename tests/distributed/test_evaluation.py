"""Evaluation split across 2 gloo ranks (dp2 under FSDP, and ep2): each rank evaluates its share
of the batches, and every rank ends with what one process gets from all of them.

The reference is a plain loop over every batch in one process, summing token-weighted numbers
in float64; it does not go through evaluate_lm.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import distributed as workers
from xmoe.models.gpt import GPT
from xmoe.moe import RoutingSummary
from xmoe.presets import get_preset

WORLD = 2
NUM_BATCHES = 3  # odd: rank 1 has one batch fewer and runs one forward whose numbers it drops


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(512, (2, 24), generator=gen), torch.randint(512, (2, 24), generator=gen))
            for _ in range(NUM_BATCHES)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    workers.spawn(workers.run_evaluation, WORLD, _batches(), str(out), timeout_s=60)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, every batch: token-weighted sums in float64, per-layer loads and histograms."""
    torch.manual_seed(0)
    model = GPT(get_preset("debug-xmoe")).eval()
    loss, tokens, layers = 0.0, 0, None
    with torch.no_grad():
        for x_BL, y_BL in _batches():
            out = model(x_BL, y_BL)
            n = y_BL.numel()
            loss += float(out.loss) * n
            tokens += n
            layers = layers or [{"pairs": 0.0, "tokens_per_expert": 0, "histogram": 0} for _ in out.stats]
            for layer, s in zip(layers, out.stats):
                layer["pairs"] += float(s.kept_per_token) * s.num_tokens
                layer["tokens_per_expert"] = layer["tokens_per_expert"] + s.tokens_per_expert
                layer["histogram"] = layer["histogram"] + s.kept_histogram
    return {"perplexity": math.exp(loss / tokens), "tokens": tokens,
            "experts_per_token": [layer["pairs"] / tokens for layer in layers],
            "tokens_per_expert": [layer["tokens_per_expert"].tolist() for layer in layers],
            "histogram": [layer["histogram"].tolist() for layer in layers]}


@pytest.mark.parametrize("layout", list(workers.EVAL_LAYOUTS))
def test_ranks_evaluate_their_share_and_agree_with_one_process_on_all_batches(ranks, reference, layout) -> None:
    for rank, result in enumerate(ranks):
        got = result[layout]["eval"]
        assert result[layout]["forwards"] == math.ceil(NUM_BATCHES / WORLD), rank  # a share, padded to the same count
        assert got["tokens"] == reference["tokens"]
        assert got["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
        assert [layer["experts_per_token"] for layer in got["layers"]] == pytest.approx(
            reference["experts_per_token"], rel=1e-6)
        assert [layer["tokens_per_expert"] for layer in got["layers"]] == reference["tokens_per_expert"]
        assert [layer["experts_histogram"] for layer in got["layers"]] == reference["histogram"]
        assert got == ranks[0][layout]["eval"]  # every rank holds the same numbers


def test_a_routing_summary_survives_its_flat_tensor_and_adds_up_like_one_summary() -> None:
    """Two summaries' flat tensors, added, read back as the summary of both sets of calls (a
    layer whose capacity drops pairs, so that kept and wanted differ)."""
    layer, xs, _ = workers.layer_case("threshold-capacity", "loop")
    with torch.no_grad():
        stats = [layer(x).stats for x in (*xs, xs[0][:4])]
    both, first, second = RoutingSummary(), RoutingSummary(), RoutingSummary()
    for i, s in enumerate(stats):
        both.add(s)
        (first if i < 2 else second).add(s)
    assert both.dropped_pairs > 0 and both.kept_pairs < both.wanted_pairs
    experts = layer.cfg.num_experts
    merged = RoutingSummary.from_tensor(first.to_tensor(experts) + second.to_tensor(experts), experts)
    for field in dataclasses.fields(RoutingSummary):
        got, want = getattr(merged, field.name), getattr(both, field.name)
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, msg=field.name)
        else:
            assert got == pytest.approx(want), field.name
    assert RoutingSummary.from_tensor(RoutingSummary().to_tensor(experts), experts) == RoutingSummary()
