"""A dense FFN in the experts' weight layout, and its exact split into E experts.

A dense FFN with hidden width F computes ``y = act(x w1 + b1) w2 + b2`` (SwiGLU:
``(silu(x w1 + b1) * (x w3 + b3)) w2 + b2``). Each hidden neuron j contributes
``h_j(x) w2[j, :]`` to y independently of the others, so for any partition of the neurons into
groups G_1..G_E,

    y = sum_e  h_{G_e}(x) w2[G_e, :]  +  b2                                          (1)

which is the MoE layer with expert e = the sub-FFN on G_e, unit combine weights
(``MoEConfig(combine="ones")``) and the output bias b2 added once, outside the experts. With
every expert engaged the converted layer equals the dense one up to fp32 summation order;
dropping expert e removes exactly its term of (1). This is MoEfication's construction (Zhang et
al., 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"), used with
XMoE's threshold router (Yang et al., 2024, arXiv 2403.18926).

Shape legend: T tokens, D model dim, F dense hidden width, E experts, G = F / E expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xmoe.errors import UsageError
from xmoe.moe import MoEConfig, MoELayer
from xmoe.moe.activations import activate


@dataclass(frozen=True, kw_only=True)
class DenseFFN:
    """The weights of one dense FFN, ``x @ w`` layout (w1 is the activated projection: GPT's
    ``up``, GPT-2's ``c_fc``, LLaMA's ``gate_proj``; w3 is LLaMA's ``up_proj``)."""

    activation: str  # an xmoe.moe activation: gelu, gelu_tanh, relu, swiglu
    w1_DF: Tensor
    w2_FD: Tensor
    b1_F: Tensor | None = None
    b2_D: Tensor | None = None
    w3_DF: Tensor | None = None  # SwiGLU only
    b3_F: Tensor | None = None

    def __post_init__(self) -> None:
        D, F = self.w1_DF.shape
        if self.w2_FD.shape != (F, D):
            raise UsageError(f"DenseFFN.w2_FD has shape {tuple(self.w2_FD.shape)}, expected {(F, D)}")
        if (self.activation == "swiglu") != (self.w3_DF is not None):
            raise UsageError("DenseFFN.w3_DF must be given for activation='swiglu', and only then")

    @property
    def d_model(self) -> int:
        return self.w1_DF.shape[0]

    @property
    def d_ff(self) -> int:
        return self.w1_DF.shape[1]

    def hidden(self, x_TD: Tensor) -> Tensor:
        """The hidden neurons' activations h(x) [T, F] (what w2 multiplies)."""
        up_TF = _affine(x_TD, self.w1_DF, self.b1_F)
        gate_TF = _affine(x_TD, self.w3_DF, self.b3_F) if self.w3_DF is not None else None
        return activate(self.activation, up_TF, gate_TF)

    def __call__(self, x_TD: Tensor) -> Tensor:
        return _affine(self.hidden(x_TD), self.w2_FD, self.b2_D)


def _affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w if b is None else x @ w + b


def group_contributions(ffn: DenseFFN, x_TD: Tensor, groups_EG: Tensor) -> Tensor:
    """``|| h_{G_e}(x) w2[G_e, :] ||`` [T, E]: how much each group carries of each token's output
    (the terms of equation (1); the router is fitted to predict them)."""
    h_TF = ffn.hidden(x_TD)
    E, G = groups_EG.shape
    h_ETG = h_TF[:, groups_EG.reshape(-1)].reshape(-1, E, G).transpose(0, 1)
    w2_EGD = ffn.w2_FD[groups_EG]
    return torch.bmm(h_ETG, w2_EGD).norm(dim=-1).T


def expert_config(ffn: DenseFFN, num_experts: int, *, threshold: float = 1.0) -> MoEConfig:
    """The MoE layer that holds ``ffn`` split into ``num_experts`` experts: threshold router,
    unit combine weights, dropless; ``top_k = E`` so that ``RoutingStats.flops_ratio`` is the
    fraction of the dense FFN's FLOPs a token engages. The output bias b2 is not in the experts
    (their b2 stays 0): the model adds it once."""
    return MoEConfig(
        model_dim=ffn.d_model,
        num_experts=num_experts,
        expert_dim=ffn.d_ff // num_experts,
        router="threshold",
        threshold=threshold,
        top_k=num_experts,
        capacity_factor=None,
        eval_capacity_factor=None,
        combine="ones",
        activation=ffn.activation,
        expert_bias=ffn.b1_F is not None or ffn.b3_F is not None,
    )


@torch.no_grad()
def split_into(layer: MoELayer, ffn: DenseFFN, groups_EG: Tensor) -> None:
    """Fill ``layer``'s experts with the groups of ``ffn``: expert e = the neurons
    ``groups_EG[e]`` (columns of w1/w3, entries of b1/b3, rows of w2). Its b2 is set to 0."""
    ex = layer.experts
    assert ex.w1.shape == (groups_EG.shape[0], ffn.d_model, groups_EG.shape[1]), "expert_config(ffn, E) builds the layer"
    ex.w1.copy_(ffn.w1_DF[:, groups_EG].permute(1, 0, 2))
    ex.w2.copy_(ffn.w2_FD[groups_EG])
    if ex.w3 is not None:
        ex.w3.copy_(ffn.w3_DF[:, groups_EG].permute(1, 0, 2))
    for param, bias in ((ex.b1, ffn.b1_F), (ex.b3, ffn.b3_F)):
        if param is not None:
            param.copy_(bias[groups_EG] if bias is not None else torch.zeros_like(param))
    if ex.b2 is not None:
        ex.b2.zero_()
