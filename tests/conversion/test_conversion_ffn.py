"""The permuted-and-split FFN against a naive float64 loop over neurons, for every activation;
the fitted router against a random one on a task whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from xmoe.conversion import (
    ConversionConfig,
    DenseFFN,
    RouterFitConfig,
    clustered_partition,
    convert_ffn,
    expert_config,
    group_contributions,
    split_into,
)
from xmoe.moe import MoELayer


def naive_act(kind, up, gate):
    if kind == "gelu":
        return 0.5 * up * (1 + math.erf(up / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * up * (1 + math.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
    if kind == "relu":
        return max(up, 0.0)
    return up / (1 + math.exp(-up)) * gate  # swiglu: silu(up) * gate


def naive_ffn(ffn: DenseFFN, x, neurons=None):
    """y[t] = sum over neurons j of act(x w1[:, j] + b1[j] (, x w3[:, j] + b3[j])) * w2[j] + b2,
    one neuron at a time in float64; ``neurons`` restricts the sum (the output bias stays)."""
    d = {k: (v.double().tolist() if v is not None else None) for k, v in vars(ffn).items() if k != "activation"}
    T, D = x.shape
    xs = x.double().tolist()
    out = []
    for t in range(T):
        y = list(d["b2_D"]) if d["b2_D"] is not None else [0.0] * D
        for j in neurons if neurons is not None else range(ffn.d_ff):
            up = sum(xs[t][i] * d["w1_DF"][i][j] for i in range(D)) + (d["b1_F"][j] if d["b1_F"] else 0.0)
            gate = None
            if d["w3_DF"] is not None:
                gate = sum(xs[t][i] * d["w3_DF"][i][j] for i in range(D)) + (d["b3_F"][j] if d["b3_F"] else 0.0)
            h = naive_act(ffn.activation, up, gate)
            for i in range(D):
                y[i] += h * d["w2_FD"][j][i]
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def random_ffn(activation, D=6, F=12, bias=True):
    b = (lambda n: torch.randn(n)) if bias else (lambda n: None)
    return DenseFFN(activation=activation, w1_DF=torch.randn(D, F), b1_F=b(F), w2_FD=torch.randn(F, D), b2_D=b(D),
                    w3_DF=torch.randn(D, F) if activation == "swiglu" else None,
                    b3_F=b(F) if activation == "swiglu" else None)


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_tanh", True), ("relu", True),
                                             ("swiglu", False), ("swiglu", True)])
def test_split_ffn_with_every_expert_equals_the_dense_ffn(activation, bias):
    ffn = random_ffn(activation, bias=bias)
    groups = torch.randperm(12).reshape(3, 4)  # a scrambled partition, not slices
    layer = MoELayer(expert_config(ffn, 3))
    split_into(layer, ffn, groups)
    x = torch.randn(5, 6)
    y = layer(x).output + (ffn.b2_D if bias else 0)  # the output bias, added once
    torch.testing.assert_close(y.double(), naive_ffn(ffn, x), rtol=1e-5, atol=1e-5)


def test_dropped_experts_remove_exactly_their_neurons():
    ffn = random_ffn("gelu")
    groups = torch.randperm(12).reshape(3, 4)
    layer = MoELayer(expert_config(ffn, 3, threshold=0.3))
    split_into(layer, ffn, groups)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(3, 6) * 5)
    x = torch.randn(4, 6)
    kept = layer.route(x).kept_TE
    assert not kept.all() and kept.any(dim=1).all()  # some experts really are dropped
    y = layer(x).output + ffn.b2_D
    for t in range(4):
        neurons = [j for e in range(3) if kept[t, e] for j in groups[e].tolist()]
        torch.testing.assert_close(y[t].double(), naive_ffn(ffn, x[t:t + 1], neurons)[0], rtol=1e-5, atol=1e-5)


def test_group_contributions_are_the_norms_of_each_groups_output():
    ffn = random_ffn("relu")
    groups = torch.randperm(12).reshape(3, 4)
    x = torch.randn(3, 6)
    got = group_contributions(ffn, x, groups)
    b2 = ffn.b2_D.double()
    for t in range(3):
        for e in range(3):
            part = naive_ffn(ffn, x[t:t + 1], groups[e].tolist())[0] - b2
            assert got[t, e].item() == pytest.approx(part.norm().item(), rel=1e-5)


def test_fitted_router_beats_a_random_one_on_a_planted_task():
    # 4 experts of 8 ReLU neurons; group e only fires on inputs near direction u_e, so the group
    # carrying a token's output is known: the one whose direction the token was drawn from.
    E, G, D, T = 4, 8, 16, 600
    u = torch.linalg.qr(torch.randn(D, E)).Q.T  # E orthonormal directions
    w1 = torch.cat([u[e][:, None] * 3 + 0.1 * torch.randn(D, G) for e in range(E)], dim=1)
    ffn = DenseFFN(activation="relu", w1_DF=w1, b1_F=torch.full((E * G,), -1.0), w2_FD=torch.randn(E * G, D),
                   b2_D=torch.zeros(D))
    source = torch.randint(E, (2 * T,))
    x = u[source] * (1 + torch.rand(2 * T, 1)) + 0.1 * torch.randn(2 * T, D)
    layer, report = convert_ffn(ffn, x[:T], ConversionConfig(num_experts=E, router=RouterFitConfig(steps=200)))
    assert report.groups == [list(range(e * G, (e + 1) * G)) for e in range(E)]
    held_out = x[T:]
    fitted_top1 = (held_out @ layer.router.weight.T).argmax(dim=1)
    random_top1 = (held_out @ torch.randn(E, D).T).argmax(dim=1)
    fitted_acc = (fitted_top1 == source[T:]).float().mean().item()
    random_acc = (random_top1 == source[T:]).float().mean().item()
    assert fitted_acc > 0.95 and random_acc < 0.6, (fitted_acc, random_acc)


def test_clustering_then_splitting_stays_exact():
    ffn = random_ffn("gelu", D=6, F=16)
    x = torch.randn(40, 6)
    groups = clustered_partition(ffn.hidden(x), 4)
    layer = MoELayer(expert_config(ffn, 4))
    split_into(layer, ffn, groups)
    torch.testing.assert_close((layer(x[:3]).output + ffn.b2_D).double(), naive_ffn(ffn, x[:3]), rtol=1e-5, atol=1e-5)
