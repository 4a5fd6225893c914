"""The XMoE layer, self-contained (torch only): the threshold router and the experts.

XMoE (Yang et al., 2024, arXiv 2403.18926, Sec. 3). For each token, with ``p = softmax(W_g x)``
(fp32) and its experts sorted from most to least probable:

    rank j is taken  iff  j == 0  or  p(0) + ... + p(j-1) < t        (t >= 1: every expert)
    y = sum over taken experts e of  w_e * FFN_e(x),   w_e = p_e     (the paper's combine)

so a token takes the smallest prefix whose mass reaches t, at least one expert. Options of the
MoE config: ``router="topk"`` (the k most probable instead), ``max_experts`` (at most that many),
``renormalize`` (w_e divided by the taken mass), ``combine="ones"`` (w_e = 1).

This is the portable reference written into exported folders; xmoe's own layer computes the
same with fast backends (and capacity limits in training, which this one does not have: it is
always dropless). Tests hold the two equal. Shapes: T tokens, D model dim, E experts, F expert
hidden dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def threshold_rule(probs_TE: Tensor, threshold: float, max_experts: int | None = None) -> Tensor:
    """bool [T, E]: the experts each token takes under the threshold rule (ties in p go to the
    lower expert index). The exclusive cumulative sum is taken in float64 so that the strict
    ``< t`` does not flip on float32 rounding."""
    sorted_p_TE, order_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
    if threshold >= 1:
        taken_sorted_TE = torch.ones_like(sorted_p_TE, dtype=torch.bool)
    else:
        before_TE = sorted_p_TE.double().cumsum(dim=-1) - sorted_p_TE.double()
        taken_sorted_TE = before_TE < threshold
    if max_experts is not None:
        taken_sorted_TE &= torch.arange(probs_TE.shape[-1], device=probs_TE.device) < max_experts
    return torch.zeros_like(taken_sorted_TE).scatter(-1, order_TE, taken_sorted_TE)


def top_k_rule(probs_TE: Tensor, k: int) -> Tensor:
    """bool [T, E]: each token's k most probable experts (ties to the lower index)."""
    order_TE = probs_TE.sort(dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(probs_TE, dtype=torch.bool).scatter(-1, order_TE[:, :k], True)


@dataclass(frozen=True)
class Routing:
    """One layer call's routing of its (unpadded) tokens."""

    logits_TE: Tensor  # fp32 router logits
    probs_TE: Tensor  # fp32 softmax over every expert
    taken_TE: Tensor  # bool: the pairs computed
    weights_TE: Tensor  # fp32 combine weights, 0 where not taken

    def balancing_loss(self) -> Tensor:
        """The Switch balancing loss XMoE trains with: E * sum_e f_e * P_e, f_e the fraction of
        tokens whose most probable expert is e, P_e the mean probability of e."""
        T, E = self.probs_TE.shape
        if T == 0:
            return self.probs_TE.sum()
        fraction_E = F.one_hot(self.probs_TE.detach().argmax(dim=-1), E).float().mean(dim=0)
        return E * (fraction_E * self.probs_TE.mean(dim=0)).sum()

    def entropy(self) -> Tensor:
        """Mean router entropy in nats (the optional sharpening loss)."""
        if self.logits_TE.shape[0] == 0:
            return self.logits_TE.sum()
        log_p_TE = self.logits_TE.log_softmax(dim=-1)
        return -(log_p_TE.exp() * log_p_TE).sum(dim=-1).mean()


class TrainedThreshold(nn.Module):
    """The t a compute-budget controller reached in training (xmoe's ``target_experts``), kept
    in float64 whatever the model's dtype, so that ``model.half()`` cannot move routing.
    ``last_error`` is the controller's state, kept so that the folder round-trips unchanged."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(start), dtype=torch.float64))
        self.register_buffer("last_error", torch.zeros((), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        for name, buf in self._buffers.items():  # follow the model's device, never its dtype
            self._buffers[name] = buf.to(device=fn(buf.float()).device, dtype=torch.float64)
        return self


class Router(nn.Module):
    """``W_g`` [E, D] without bias, and the routing rule of the MoE config."""

    def __init__(self, moe: dict) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe["num_experts"], moe["model_dim"]))
        nn.init.normal_(self.weight, std=moe.get("init_std") or 0.02)
        self.dial = TrainedThreshold(moe["threshold"]) if moe.get("target_experts") is not None else None

    def forward(self, x_TD: Tensor, threshold: float | None) -> Routing:
        """``threshold``: the dial (None: the trained t)."""
        # fp32: routing decisions are discontinuous in p, low-precision logits would move tokens.
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        moe = self.moe
        with torch.no_grad():
            if moe.get("router", "threshold") == "topk":
                taken_TE = top_k_rule(probs_TE, moe["top_k"])
            else:
                if threshold is None:
                    if self.dial is None:
                        raise ValueError("config.moe_threshold is None, but this layer has no trained t; set "
                                         "config.moe_threshold to a number in (0, 1]")
                    threshold = float(self.dial.threshold)
                taken_TE = threshold_rule(probs_TE, threshold, moe.get("max_experts"))
        if moe.get("combine", "probs") == "ones":
            weights_TE = torch.ones_like(probs_TE)
        elif moe.get("renormalize"):
            weights_TE = probs_TE / (probs_TE * taken_TE).sum(dim=-1, keepdim=True)
        else:
            weights_TE = probs_TE
        return Routing(logits_TE, probs_TE, taken_TE, weights_TE * taken_TE)


class Experts(nn.Module):
    """E feed-forward networks stored as 3-D weights (x @ w layout):

        w1 [E, D, F] b1 [E, F]   up;   w3 [E, D, F] b3 [E, F]   gate (swiglu);   w2 [E, F, D] b2 [E, D]   down
        FFN_e(x) = act(x w1_e + b1_e) w2_e + b2_e,   swiglu: (silu(x w1_e + b1_e) * (x w3_e + b3_e)) w2_e + b2_e

    The weights are read inside ``forward`` only, so wrappers that transform them during the
    call (PEFT's LoRA on ``experts.w1`` and the others) see every use."""

    def __init__(self, moe: dict) -> None:
        super().__init__()
        E, D, F_ = moe["num_experts"], moe["model_dim"], moe["expert_dim"]
        self.activation = moe.get("activation", "gelu")
        bias = moe.get("expert_bias", True)
        swiglu = self.activation == "swiglu"
        self.w1 = nn.Parameter(torch.randn(E, D, F_) * D**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, F_, D) * F_**-0.5)
        self.w3 = nn.Parameter(torch.randn(E, D, F_) * D**-0.5) if swiglu else None
        self.b1 = nn.Parameter(torch.zeros(E, F_)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(E, D)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(E, F_)) if bias and swiglu else None

    def forward(self, x_TD: Tensor, taken_TE: Tensor, weights_TE: Tensor) -> Tensor:
        """sum over taken (t, e) of weights_TE[t, e] * FFN_e(x_TD[t]): [T, D], accumulated in fp32.
        One loop over the experts that have tokens, each on the rows of its own tokens."""
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        # Split once (indexing a 3-D parameter per expert would give autograd E full-size gradients).
        w1, b1, w3, b3, w2, b2 = (None if w is None else w.unbind(0)
                                  for w in (self.w1, self.b1, self.w3, self.b3, self.w2, self.b2))
        for e in taken_TE.any(dim=0).nonzero().flatten().tolist():
            rows_N = taken_TE[:, e].nonzero().flatten()
            x_ND = x_TD.index_select(0, rows_N)
            up_NF = _affine(x_ND, w1[e], _at(b1, e))
            if self.activation == "swiglu":
                h_NF = F.silu(up_NF) * _affine(x_ND, w3[e], _at(b3, e))
            elif self.activation == "relu":
                h_NF = F.relu(up_NF)
            else:
                h_NF = F.gelu(up_NF, approximate="tanh" if self.activation == "gelu_tanh" else "none")
            y_ND = _affine(h_NF, w2[e], _at(b2, e))
            y_TD.index_add_(0, rows_N, y_ND.float() * weights_TE[rows_N, e, None])
        return y_TD.to(x_TD.dtype)


def _affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


def _at(biases: tuple[Tensor, ...] | None, e: int) -> Tensor | None:
    return None if biases is None else biases[e]


class MoELayer(nn.Module):
    """Route, then compute the taken experts. Reads the dial from ``config.moe_threshold`` at
    every call. ``mask`` (bool, ``x.shape[:-1]``, True = a real token) keeps padding out: pad
    tokens are not routed, cost nothing and output 0 (the residual carries them)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config.moe)
        self.experts = Experts(config.moe)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Routing]:
        x_TD = x.reshape(-1, x.shape[-1])
        rows = None if mask is None else mask.reshape(-1).nonzero().flatten()
        real_TD = x_TD if rows is None else x_TD.index_select(0, rows)
        routing = self.router(real_TD, self.config.moe_threshold)
        y_TD = self.experts(real_TD, routing.taken_TE, routing.weights_TE)
        if rows is not None:
            y_TD = x_TD.new_zeros(x_TD.shape).index_copy(0, rows, y_TD)
        return y_TD.reshape(x.shape), routing
