"""Static mode (no host sync: CUDA graphs, torch.compile(fullgraph=True)), the cap it needs, the
host-read budget of a layer call, lazy statistics and the once-per-step weight cast.

Static mode is held to the same float64 oracle as every backend, on the same cases; compiled
with fullgraph=True (which fails on any data-dependent branch or host read), it must agree too.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.moe import CPU_BACKENDS, MARGIN, make_layer, params64, run_oracle
from test_backends_vs_oracle import CASES, Case, _check_against_oracle, peaked
from xmoe.bench.probes import CountOps, cuda_syncs
from xmoe.moe import MoEConfig, MoELayer, backends
from xmoe.moe.backends import grouped

E = 8


def _static(case: Case) -> Case:
    """The case in static mode; a dropless threshold rule gets the cap static mode needs (E: the
    rule unchanged, so the pairs are padded to T * E)."""
    cfg = dict(case.cfg, static_shapes=True)
    dropless = cfg.get("capacity_factor") is None or cfg.get("eval_capacity_factor") is None
    if cfg.get("router", "threshold") == "threshold" and dropless and "max_experts" not in cfg:
        cfg["max_experts"] = E
    return dataclasses.replace(case, cfg=cfg)


STATIC_BACKENDS = [b for b in CPU_BACKENDS if backends.get(b).static]  # triton under its interpreter


@pytest.mark.parametrize("backend", STATIC_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_static_mode_matches_oracle(case: Case, backend: str) -> None:
    _check_against_oracle(_static(case), backend)


def test_static_mode_pads_and_padding_contributes_nothing() -> None:
    """Kept pairs well below the bound: the padding rows hold whatever grouped_mm left there and
    must change neither the output nor any gradient; idle experts get exactly zero gradients."""
    layer = make_layer(threshold=0.5, max_experts=E, static_shapes=True)
    x = peaked(layer)
    plan_rows = layer.router.max_pairs(x.shape[0])
    kept = int(layer.route(x).kept_TE.sum())
    assert kept < plan_rows / 2
    ref = make_layer(threshold=0.5, max_experts=E, backend="loop")
    ref.load_state_dict(layer.state_dict())
    xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (layer(xs).output * g).sum().backward()
    (ref(xr).output * g).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(layer.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    idle = layer.route(x).kept_TE.sum(0) == 0
    if idle.any():
        assert layer.experts.w1.grad[idle].abs().max() == 0


def test_static_mode_compiles_with_fullgraph_and_matches_oracle() -> None:
    """fullgraph=True refuses any graph break, so a host read anywhere in forward or backward
    fails the compile. CPU grouped_mm compiles in bfloat16 only (its meta kernel asks for it);
    aot_eager traces forward and backward without the minutes of C++ codegen inductor takes."""
    torch._dynamo.reset()
    layer = make_layer(model_dim=16, threshold=0.8, max_experts=4, static_shapes=True).to(torch.bfloat16)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    y64, _, _, routing = run_oracle(layer, x)
    assert routing.margin > 10 * MARGIN  # the router runs in fp32 on bf16-exact numbers
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xg = x.clone().requires_grad_(True)
    out = compiled(xg)
    torch.testing.assert_close(out.output.double(), y64, rtol=3e-2, atol=3e-2)
    eager = layer(x)
    torch.testing.assert_close(out.output, eager.output, rtol=0, atol=0)
    out.output.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert layer.experts.w1.grad is not None


@pytest.mark.slow
def test_static_mode_compiles_with_inductor() -> None:
    torch._dynamo.reset()
    layer = make_layer(model_dim=16, threshold=0.8, max_experts=4, static_shapes=True).to(torch.bfloat16)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x).output, layer(x).output, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(threshold=0.99, max_experts=3),
        dict(threshold=1.0, capacity_factor=1.0, eval_capacity_factor=0.5, min_capacity=1),
        dict(router="topk", top_k=3),
        dict(router="topk", top_k=5, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=0),
    ],
)
def test_max_pairs_bounds_the_kept_pairs(cfg: dict, training: bool) -> None:
    """The bound static mode pads to is never below the pairs actually kept, and is reached
    when tokens want as much as they can."""
    layer = make_layer(**cfg, static_shapes=True).train(training)
    for scale in (0.0, 1.0, 30.0):  # uniform (most experts wanted), mixed, peaked
        with torch.no_grad():
            layer.router.weight.normal_().mul_(scale)
        x = torch.randn(17, 8, generator=torch.Generator().manual_seed(1))
        kept = int(layer.route(x).kept_TE.sum())
        assert kept <= layer.router.max_pairs(17)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(static_shapes=True), "max_experts"),
        (dict(static_shapes=True, capacity_factor=2.0), "max_experts"),  # eval is dropless
        (dict(static_shapes=True, max_experts=2, check_finite=True), "check_finite"),
        (dict(max_experts=0), "max_experts"),
        (dict(max_experts=9), "max_experts"),
        (dict(router="topk", max_experts=2), "top_k"),
    ],
)
def test_static_config_errors_name_the_setting(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(model_dim=8, num_experts=E, expert_dim=16, **fields)


def test_static_mode_follows_router_settings_changed_after_construction() -> None:
    """The padded size comes from the router's live settings (its dial): raising top_k or
    max_experts on a built layer must not lose pairs."""
    for rule, change in (("topk", dict(top_k=4)), ("threshold", dict(max_experts=5))):
        fields = dict(router=rule, top_k=2, max_experts=2 if rule == "threshold" else None, threshold=0.99)
        static = make_layer(**fields, static_shapes=True)
        ref = make_layer(**fields, backend="loop")
        ref.load_state_dict(static.state_dict())
        for layer in (static, ref):
            for name, value in change.items():
                setattr(layer.router.dial, name, value)
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
        assert int(ref.route(x).kept_TE.sum()) > 20  # more than the bound the config was built with
        torch.testing.assert_close(static(x).output, ref(x).output, rtol=1e-5, atol=1e-6)


def test_static_mode_takes_an_empty_batch() -> None:
    layer = make_layer(max_experts=2, static_shapes=True)
    x = torch.randn(0, 8, requires_grad=True)
    out = layer(x)
    out.output.sum().backward()
    assert out.output.shape == (0, 8) and x.grad.shape == (0, 8)


def test_static_mode_refuses_expert_parallelism() -> None:
    from xmoe.distributed import shard_experts

    layer = make_layer(max_experts=2, static_shapes=True)
    with pytest.raises(ValueError, match="expert parallelism"):
        shard_experts(layer, ep_rank=0, ep_size=2, group=None)


def test_static_grouped_mm_on_a_gpu_without_its_fast_kernel_is_refused(monkeypatch) -> None:
    """There torch's grouped_mm reads the offsets on the host: static mode would sync."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    experts = make_layer(model_dim=16).experts
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sm90"):
        backends.choose("grouped_mm", experts, x, static=True)


@pytest.mark.parametrize("backend", ["loop", "fused", "direct"])
def test_static_mode_refuses_backends_that_read_counts(backend: str) -> None:
    layer = make_layer(max_experts=2, static_shapes=True, backend=backend)
    with pytest.raises(ValueError, match="static_shapes"):
        layer(torch.randn(4, 8))


def test_static_mode_refuses_a_padding_mask() -> None:
    layer = make_layer(max_experts=2, static_shapes=True)
    with pytest.raises(ValueError, match="static_shapes"):
        layer(torch.randn(2, 3, 8), mask=torch.ones(2, 3, dtype=torch.bool))


# --- host reads ---------------------------------------------------------------------------

# Ops whose result the host must wait for: data-dependent shapes or Python scalars.
HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


class _CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts host reads: the ops above, and Tensor.tolist (which does not pass the dispatcher)."""
    mode = _CountHostReads()
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        mode.reads.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    return mode


@pytest.mark.parametrize("backend", ["loop", "fused", "grouped_mm", "direct"])
def test_one_host_read_per_forward_none_in_backward(backend: str, count_host_reads, monkeypatch) -> None:
    """Outside the router's CPU-only fast paths (whose branches are free on a CPU and never run
    on a GPU, so they are switched off here as a GPU would), one read per forward: the counts,
    with the non-finite check riding on it. None in backward."""
    from xmoe.moe import router as router_module

    wanted_pairs = router_module.wanted_pairs
    apply_capacity = router_module.apply_capacity
    monkeypatch.setattr(router_module, "wanted_pairs", lambda *a, **k: wanted_pairs(*a, **{**k, "fast": False}))
    # No capacity shortcut either: the GPU path.
    monkeypatch.setattr(router_module, "apply_capacity", lambda *a, **k: apply_capacity(*a, **{**k, "shortcut": False}))
    layer = make_layer(threshold=0.9, capacity_factor=1.0, min_capacity=1, backend=backend)
    x = peaked(layer).requires_grad_(True)
    with count_host_reads:
        out = layer(x)
    assert count_host_reads.reads == ["tolist"]
    count_host_reads.reads.clear()
    with count_host_reads:
        (out.output.sum() + out.aux_loss).backward()
    assert count_host_reads.reads == []


def test_static_mode_reads_nothing(count_host_reads) -> None:
    layer = make_layer(threshold=0.9, max_experts=3, static_shapes=True)
    x = peaked(layer).requires_grad_(True)
    with count_host_reads:
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()
    assert count_host_reads.reads == []


# --- lazy statistics ------------------------------------------------------------------------


def test_statistics_cost_nothing_until_read() -> None:
    layer = make_layer(threshold=0.9, backend="grouped_mm")
    x = peaked(layer)
    with torch.no_grad():
        out = layer(x)
        with CountOps() as read_one:
            kept = out.stats.kept_per_token
        with CountOps() as read_again:
            assert out.stats.kept_per_token is kept
        with CountOps() as read_all:
            stats = out.stats.to_dict()
    assert read_one.count > 0 and read_again.count == 0
    assert read_all.count > 10  # the rest, computed now and not before
    # and what was read is right: the oracle's kept pairs per token
    routing = run_oracle(layer, x)[3]
    assert stats["kept_per_token"] == pytest.approx(len(routing.kept) / x.shape[0], rel=1e-6)
    assert stats["backend"] == "grouped_mm"


# --- the weight cast under autocast ----------------------------------------------------------


def test_expert_weights_are_cast_once_per_optimizer_step() -> None:
    """Two micro-batches of one step share one bf16 cast of the experts; their gradients add up
    exactly as with a fresh cast each; after optimizer.step() the cast follows the new weights."""
    layer = make_layer(model_dim=16, threshold=0.9, backend="grouped_mm")
    fresh = make_layer(model_dim=16, threshold=0.9, backend="grouped_mm")
    fresh.load_state_dict(layer.state_dict())
    xs = [torch.randn(12, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    casts = []
    for x in xs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            casts.append(layer.experts.weights(torch.bfloat16))
            layer(x).output.float().sum().backward()
            fresh.experts.drop_cast_cache()
            fresh(x).output.float().sum().backward()
    assert casts[0] is casts[1]
    for (name, a), (_, b) in zip(layer.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)

    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = layer.experts.weights(torch.bfloat16)
    assert after is not casts[0]
    torch.testing.assert_close(after.w1, layer.experts.w1.detach().bfloat16(), rtol=0, atol=0)


def test_the_cast_follows_a_fused_optimizer_step() -> None:
    """Fused optimizers update the weights in place without moving their version counter."""
    layer = make_layer(model_dim=16, backend="grouped_mm")
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).output.float().sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = layer.experts.weights(torch.bfloat16)
    torch.testing.assert_close(cast.w1, layer.experts.w1.detach().bfloat16(), rtol=0, atol=0)


def test_a_cast_made_without_grad_is_not_reused_with_grad() -> None:
    layer = make_layer(model_dim=16, backend="grouped_mm")
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            layer(x)
        layer(x).output.float().sum().backward()
    assert layer.experts.w1.grad is not None


# --- auto -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capability, dtype, static, local, expected",
    [
        ((9, 0), torch.bfloat16, False, True, "grouped_mm"),
        ((10, 0), torch.bfloat16, True, True, "grouped_mm"),
        ((9, 0), torch.float32, False, True, "fused"),
        ((8, 0), torch.bfloat16, False, True, "fused"),
        ((8, 9), torch.bfloat16, False, False, "loop"),
        ((9, 0), torch.bfloat16, False, False, "grouped_mm"),
    ],
)
def test_auto_on_cuda_picks_grouped_mm_only_where_torch_has_its_fast_kernel(
    capability, dtype, static, local, expected, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    experts = make_layer(model_dim=16).experts
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)
    assert backends.auto_backend(experts, x, static=static, local=local) == expected


def test_auto_static_on_a_gpu_without_fast_grouped_mm_needs_triton(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(backends, "triton_problem", lambda experts, x: "Triton is not installed")
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="triton"):
        backends.auto_backend(make_layer(model_dim=16).experts, x, static=True)


@pytest.mark.parametrize("tokens, expected", [(1, "direct"), (backends.DIRECT_MAX_TOKENS, "direct"),
                                               (backends.DIRECT_MAX_TOKENS + 1, "fused")])
def test_auto_says_what_it_chose_by_device_and_size(tokens: int, expected: str, caplog) -> None:
    """On a CPU, a few tokens (decoding) take the small-T path, more the fused backend; the same
    layer switches between them as the call's size changes."""
    backends._announce.cache_clear()
    layer = make_layer()
    layer(torch.randn(1 if expected == "fused" else 64, 8))  # first the other one: chosen per size
    with caplog.at_level("INFO", logger="xmoe.moe"):
        out = layer(torch.randn(tokens, 8))
    assert out.stats.backend == expected
    assert f"'{expected}'" in caplog.text


def test_a_local_backend_under_expert_parallelism_runs_its_rows_equivalent_and_says_so(caplog) -> None:
    """Named, with a warning; under auto, the log line says why."""
    backends._announce.cache_clear()
    experts = make_layer().experts
    with pytest.warns(UserWarning, match="runs 'loop'"):
        assert backends.choose("direct", experts, torch.randn(2, 8), local=False).name == "loop"
    with caplog.at_level("INFO", logger="xmoe.moe"):
        assert backends.choose("auto", experts, torch.randn(2, 8), local=False).name == "loop"
    assert "'loop' on cpu torch.float32 (experts spread over ranks)" in caplog.text


# --- CUDA, when there is one ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("static", [False, True])
def test_cuda_host_syncs(static: bool) -> None:
    """On CUDA, with torch's own sync detector: at most one sync per forward, none per backward,
    none at all in static mode."""
    fields = dict(model_dim=64, num_experts=16, expert_dim=32, threshold=0.9, capacity_factor=2.0,
                  eval_capacity_factor=2.0)
    layer = MoELayer(MoEConfig(**fields, static_shapes=static)).cuda()  # auto: grouped_mm on sm90
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)  # static mode's fast path is bf16
    with autocast:
        layer(x).output.float().sum().backward()  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    with autocast, cuda_syncs() as forward:
        out = layer(x)
    with autocast, cuda_syncs() as backward:
        out.output.float().sum().backward()
    assert (len(forward), len(backward)) == (0 if static else 1, 0), forward + backward
