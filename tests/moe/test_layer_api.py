"""The layer's contract around the math: config validation, bad inputs, non-finite inputs,
tiny batches, train/eval capacity, the threshold dial, expert initialisation, and the
one-expert layer that must be a plain dense MLP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import oracle
from helpers.moe import CPU_BACKENDS, make_layer, oracle_routing, run_oracle
from xmoe.moe import MoEConfig, MoELayer, set_threshold

BASE = dict(model_dim=8, num_experts=4, expert_dim=16)

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("threshold", 0.0),
        ("threshold", -0.5),
        ("threshold", float("nan")),
        ("threshold", "0.9"),
        ("num_experts", 0),
        ("num_experts", -2),
        ("model_dim", 0),
        ("expert_dim", 0),
        ("num_experts", 2.0),
        ("top_k", 0),
        ("capacity_factor", -1.0),
        ("capacity_factor", 0.0),
        ("eval_capacity_factor", -0.5),
        ("min_capacity", -1),
        ("activation", "tanh"),
        ("combine", "sum"),
        ("router", "expert_choice"),
        ("backend", "triton_v9"),
        ("init", "orthogonal"),
        ("init_std", 0.0),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**BASE, field: value})


def test_topk_router_rejects_k_above_num_experts() -> None:
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        MoEConfig(**{**BASE, "router": "topk", "top_k": 5})


def test_config_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        MoEConfig(8, 4, 16)  # noqa
    cfg = MoEConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.threshold = 0.5


def test_threshold_router_ignores_top_k() -> None:
    """top_k belongs to the top-k router; a threshold layer with one expert (a dense FFN, as in
    the dense-model experiments) must build with the default top_k=2 rather than be rejected
    for a field it never reads."""
    layer = MoELayer(MoEConfig(model_dim=8, num_experts=1, expert_dim=16, router="threshold"))
    assert layer.route(torch.randn(3, 8)).wanted_TE.all()


def test_unknown_backend_at_runtime_raises_value_error() -> None:
    layer = make_layer(**BASE)
    layer.backend = "nope"
    with pytest.raises(ValueError, match="backend"):
        layer(torch.randn(3, 8))


@pytest.mark.parametrize(
    "dims, dtype",
    [((6, 16), torch.float32), ((8, 10), torch.float32), ((8, 16), torch.float64)],
    ids=["model_dim-6", "expert_dim-10", "float64"],
)
def test_grouped_mm_refuses_what_it_cannot_run_with_value_error(dims, dtype) -> None:
    """grouped_mm needs rows of a multiple of 16 bytes and fp32/bf16/fp16; anything else must be
    a ValueError that says so, not an error from inside the kernel."""
    D, F = dims
    layer = make_layer(model_dim=D, expert_dim=F, num_experts=4, backend="grouped_mm").to(dtype)
    with pytest.raises(ValueError, match="grouped_mm"):
        layer(torch.randn(5, D, dtype=dtype))


@pytest.mark.parametrize("factor", [float("inf"), 1e308])
def test_huge_capacity_factor_is_rejected_or_dropless(factor: float) -> None:
    """A config that constructs must run: capacity_factor=inf either fails in MoEConfig with
    a ValueError or behaves as 'no limit' (C = S)."""
    try:
        layer = make_layer(**BASE, capacity_factor=factor)
    except ValueError as err:
        assert "capacity_factor" in str(err)
        return
    x = torch.randn(6, 8)
    out = layer(x)
    assert out.stats.capacity == 6
    assert int(out.stats.dropped_pairs) == 0


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("method", ["forward", "route"])
def test_wrong_last_dimension(method: str) -> None:
    layer = make_layer(**BASE)
    call = getattr(layer, method)
    with pytest.raises(ValueError, match="model_dim"):
        call(torch.randn(3, 7))
    with pytest.raises(ValueError, match="model_dim"):
        call(torch.tensor(1.0))


# Training, and decoding's sizes at inference (1 and 3 tokens: the CPU decoding path, moe/decode.py).
CALLS = [pytest.param(False, 3, id="training"), pytest.param(True, 1, id="decoding-1"),
         pytest.param(True, 3, id="decoding-3")]


def _call(layer: MoELayer, x: torch.Tensor, inference: bool):
    if not inference:
        return layer(x)
    layer.eval()
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("inference, tokens", CALLS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input(dtype, inference: bool, tokens: int) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        _call(make_layer(**BASE), torch.ones(tokens, 8, dtype=dtype), inference)


@pytest.mark.parametrize("inference, tokens", CALLS)
def test_dtype_mismatch_without_autocast(inference: bool, tokens: int) -> None:
    layer = make_layer(**BASE)
    for dtype in (torch.bfloat16, torch.float64):
        with pytest.raises(ValueError, match="does not match the layer's parameter dtype"):
            _call(layer, torch.randn(tokens, 8, dtype=dtype), inference)
    with pytest.raises(ValueError, match="dtype"):
        layer.route(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_input_raises_floating_point_error(bad: float, backend: str) -> None:
    layer = make_layer(**BASE, backend=backend)
    x = torch.randn(5, 8)
    x[3, 2] = bad
    with pytest.raises(FloatingPointError):
        layer(x)
    with pytest.raises(FloatingPointError):
        layer.route(x)


def test_non_finite_router_weight_raises_floating_point_error() -> None:
    layer = make_layer(**BASE)
    with torch.no_grad():
        layer.router.weight[1, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("logit", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logit_raises_when_decoding_too(logit: float) -> None:
    """Decoding decides on the host, and the check goes with it. A -inf logit leaves every
    probability finite (its expert gets p = 0): only the logits can tell."""
    layer = make_layer(**BASE).eval()
    x = torch.randn(1, 8)
    x[0, 0] = 1.0
    with torch.no_grad():
        layer.router.weight[1] = 0.0
        layer.router.weight[1, 0] = logit
        with pytest.raises(FloatingPointError):
            layer(x)
        unchecked = make_layer(**BASE, check_finite=False).eval()
        unchecked.load_state_dict(layer.state_dict())
        decision = unchecked(x).decision
    if logit < 0:  # the probabilities are finite: the host decided, and the check still caught it
        assert decision.host is not None and torch.isfinite(decision.probs_TE).all()


def test_a_probability_that_underflows_is_not_a_non_finite_logit() -> None:
    """Decoding checks the logits from the probabilities it read (all > 0: every logit finite);
    a finite logit ~200 below the others gives p = 0 exactly, and the logits are read to tell it
    from a -inf one: no error, and the output is the oracle's."""
    layer = make_layer(**BASE).eval()
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor([1.0, 0.5, 0.0, -200.0])
        out = layer(x)
    assert out.decision.host is not None and out.decision.probs_TE[0, 3] == 0.0
    torch.testing.assert_close(out.output.double(), run_oracle(layer, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_check_finite_false_skips_the_check(backend: str) -> None:
    layer = make_layer(**BASE, backend=backend, check_finite=False)
    x = torch.randn(5, 8)
    x[3, 2] = float("nan")
    out = layer(x)  # no error: the caller asked for no check
    assert out.output.shape == x.shape
    assert torch.isfinite(out.output[[0, 1, 2, 4]]).all()  # the other tokens are unharmed
    assert not torch.isfinite(out.output[3]).all()
    layer.route(x)


# ----------------------------------------------------------------------------- capacity modes


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_smaller_than_min_capacity(backend: str) -> None:
    """S = 2 < m = 4: C clamps to S, so nothing can overflow, and the output is the oracle's."""
    layer = make_layer(backend=backend, capacity_factor=1.0, min_capacity=4, threshold=0.9)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    assert out.stats.capacity == 2
    assert int(out.stats.dropped_pairs) == 0
    y64, _, _, routing = run_oracle(layer, x)
    assert routing.capacity == 2
    torch.testing.assert_close(out.output.double(), y64.detach(), rtol=1e-5, atol=1e-5)
    layer(torch.randn(1, 8))  # a single token too


def test_capacity_factor_applies_in_training_eval_capacity_factor_in_eval() -> None:
    layer = make_layer(num_experts=8, threshold=0.9, capacity_factor=1.0, eval_capacity_factor=None, min_capacity=1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    layer.train()
    assert layer.route(x).capacity == 4  # ceil(1.0 * 32 / 8)
    assert int(layer(x).stats.dropped_pairs) > 0
    layer.eval()
    assert layer.route(x).capacity is None  # dropless at inference by default
    assert int(layer(x).stats.dropped_pairs) == 0

    layer = make_layer(num_experts=8, threshold=0.9, capacity_factor=None, eval_capacity_factor=0.5, min_capacity=1)
    layer.train()
    assert layer.route(x).capacity is None
    layer.eval()
    assert layer.route(x).capacity == 2  # ceil(0.5 * 32 / 8)
    assert max(layer(x).stats.tokens_per_expert.tolist()) <= 2


def test_dropped_token_still_gets_zero_not_garbage() -> None:
    """A token whose only pair is dropped contributes nothing: its MoE output is exactly 0."""
    layer = make_layer(threshold=0.5, capacity_factor=1.0, min_capacity=1, num_experts=8)
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 2.0
    x = torch.randn(16, 8)
    x[:, 0] = 3.0
    decision = layer.route(x)
    dropped = decision.kept_TE.sum(dim=-1) == 0
    assert dropped.sum() == 14  # C = 2 of 16 tokens
    assert torch.equal(layer(x).output[dropped], torch.zeros(14, 8))


# ----------------------------------------------------------------------------- threshold dial


def test_set_threshold_changes_experts_per_token_without_rebuilding() -> None:
    layer = make_layer(num_experts=8, threshold=0.95).eval()
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    params_before = {name: p for name, p in layer.named_parameters()}
    state_before = {k: v.clone() for k, v in layer.state_dict().items()}
    wide = layer(x).stats.wanted_per_token.item()

    layer.set_threshold(0.5)
    assert layer.threshold == 0.5
    narrow = layer(x).stats.wanted_per_token.item()
    assert narrow < wide
    routing = oracle_routing(layer, x)  # with the live t = 0.5
    assert routing.margin > 2e-6
    assert torch.equal(layer.route(x).wanted_TE, routing.wanted_mask(8))
    assert narrow == pytest.approx(sum(len(w) for w in routing.wanted) / 40)
    # Same parameter objects, same values: nothing was rebuilt.
    assert all(p is params_before[name] for name, p in layer.named_parameters())
    assert all(torch.equal(v, state_before[k]) for k, v in layer.state_dict().items())

    layer.set_threshold(1.0)
    assert layer(x).stats.wanted_per_token.item() == 8


def test_set_threshold_on_a_model() -> None:
    model = nn.Sequential(
        make_layer(**BASE, threshold=0.9),
        nn.Sequential(make_layer(**BASE, threshold=0.8)),
        make_layer(**BASE, router="topk", top_k=2),
    )
    assert set_threshold(model, 0.6) == 2
    assert model[0].threshold == 0.6 and model[1][0].threshold == 0.6
    assert model[2].router.dial.top_k == 2
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(4))
    for layer in (model[0], model[1][0]):  # both now route with t = 0.6
        routing = oracle_routing(layer, x)
        assert routing.margin > 2e-6
        assert torch.equal(layer.route(x).wanted_TE, routing.wanted_mask(4))
    # The top-k layer still picks exactly 2 per token.
    assert (model[2].route(x).wanted_TE.sum(dim=-1) == 2).all()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, float("nan"), "0.5", None, True])
def test_invalid_threshold_at_inference_raises_and_keeps_the_old_one(bad) -> None:
    layer = make_layer(**BASE, threshold=0.9)
    with pytest.raises(ValueError, match="threshold"):
        layer.set_threshold(bad)
    assert layer.threshold == 0.9
    model = nn.Sequential(layer, make_layer(**BASE, threshold=0.8))
    with pytest.raises(ValueError, match="threshold"):
        set_threshold(model, bad)
    assert model[0].threshold == 0.9 and model[1].threshold == 0.8


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("init_std", [None, 0.02])
def test_identical_init_gives_identical_experts(activation: str, init_std) -> None:
    layer = make_layer(**BASE, init="identical", activation=activation, init_std=init_std)
    for name, p in layer.experts.named_parameters():
        for e in range(1, 4):
            assert torch.equal(p[e], p[0]), f"{name}[{e}] differs from {name}[0]"
    # So the layer is (sum of kept weights) * the one expert: check against the oracle's expert 0.
    x = torch.randn(6, 8)
    _, _, weights64, _ = run_oracle(layer, x)
    decision = layer.route(x)
    mass = decision.weights_TE.sum(dim=-1, keepdim=True)
    single = MoELayer(MoEConfig(**{**BASE, "num_experts": 1}, top_k=1, activation=activation))
    with torch.no_grad():
        for name, p in single.experts.named_parameters():
            p.copy_(getattr(layer.experts, name)[:1])
    torch.testing.assert_close(layer(x).output, mass * single(x).output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init_std", [None, 0.02])
def test_default_init_gives_different_experts(init_std) -> None:
    layer = make_layer(**BASE, init_std=init_std)
    for name in ("w1", "w2"):
        p = getattr(layer.experts, name)
        for a in range(4):
            for b in range(a + 1, 4):
                assert not torch.equal(p[a], p[b]), f"{name}[{a}] == {name}[{b}]"
    if init_std is not None:
        assert layer.experts.w1.std().item() == pytest.approx(init_std, rel=0.2)
    else:
        bound = 1 / math.sqrt(8)  # nn.Linear's default range, fan_in = model_dim
        assert layer.experts.w1.abs().max() <= bound


# ----------------------------------------------------------------------------- dense equivalence


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_one_expert_layer_is_a_dense_mlp(backend: str, activation: str, rule: str) -> None:
    """E = 1: p = softmax of one logit = 1, so the layer is Linear -> act -> Linear."""
    layer = make_layer(num_experts=1, router=rule, top_k=1, activation=activation, backend=backend)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU() if activation == "gelu" else nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        mlp[0].weight.copy_(layer.experts.w1[0].T)
        mlp[0].bias.copy_(layer.experts.b1[0])
        mlp[2].weight.copy_(layer.experts.w2[0].T)
        mlp[2].bias.copy_(layer.experts.b2[0])
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer.route(x).weights_TE, torch.ones(10, 1))
    out = layer(x)
    torch.testing.assert_close(out.output, mlp(x), rtol=1e-5, atol=1e-6)
    assert out.output.shape == (2, 5, 8)

    g = torch.randn(2, 5, 8)
    (out.output * g).sum().backward()
    (mlp(x) * g).sum().backward()
    torch.testing.assert_close(layer.experts.w1.grad[0], mlp[0].weight.grad.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.b2.grad[0], mlp[2].bias.grad, rtol=1e-5, atol=1e-6)
    assert layer.router.weight.grad.abs().max() < 1e-6  # p = 1 whatever the router does


# ----------------------------------------------------------------------------- padding mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_tokens_are_never_routed(backend: str) -> None:
    """With a mask, the layer is exactly the layer run on the real tokens alone: padding takes
    no capacity (C is computed from the real count), no compute, and is absent from the loss and
    the statistics; its output is 0."""
    layer = make_layer(threshold=0.8, capacity_factor=1.0, min_capacity=1, backend=backend)
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :7] = mask[1, :2] = mask[2, :10] = True  # 19 real tokens of 30
    real = x[mask]
    y64, probs64, _, routing = run_oracle(layer, real)

    out = layer(x, mask=mask)
    assert out.output.shape == x.shape
    assert torch.equal(out.output[~mask], torch.zeros_like(out.output[~mask]))
    torch.testing.assert_close(out.output[mask].double(), y64, rtol=1e-5, atol=1e-5)
    assert out.stats.num_tokens == 19 and out.stats.capacity == routing.capacity == math.ceil(19 / 8)
    assert int(out.stats.tokens_per_expert.sum()) == len(routing.kept)
    torch.testing.assert_close(out.aux_loss.double(), oracle.balancing_loss(probs64), rtol=1e-5, atol=1e-6)


def test_masked_gradients_reach_only_real_tokens() -> None:
    layer = make_layer(threshold=0.9)
    x = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, False, False]])
    out = layer(x, mask=mask)
    (out.output.sum() + out.aux_loss).backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert x.grad[mask].abs().sum(dim=-1).gt(0).all()


def test_all_padding_gives_zeros_and_zero_loss() -> None:
    layer = make_layer()
    x = torch.randn(2, 3, 8)
    out = layer(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out.output, torch.zeros_like(x)) and out.aux_loss.item() == 0.0
    assert out.stats.num_tokens == 0


@pytest.mark.parametrize("mask", [torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3), torch.ones(6, dtype=torch.bool)])
def test_bad_mask_raises_value_error(mask) -> None:
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        make_layer()(torch.randn(2, 3, 8), mask=mask)
