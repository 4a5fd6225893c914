"""The experts: E small feed-forward networks stored as stacked 3-D weights.

One layout serves every backend (``x @ w``, no transposes):

    w1 [E, D, F]   b1 [E, F]        up projection
    w3 [E, D, F]   b3 [E, F]        gate projection (SwiGLU only)
    w2 [E, F, D]   b2 [E, D]        down projection

    FFN_e(x) = act(x w1_e + b1_e) w2_e + b2_e          gelu, relu
    FFN_e(x) = (silu(x w1_e + b1_e) * (x w3_e + b3_e)) w2_e + b2_e    swiglu

The experts never see the router: they take the tokens and a dispatch plan (which pairs, in
which order, with which weights), as ScatterMoE's MLP takes routing as input. How the pairs are
gathered, computed and combined is the backend's business (backends/).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .activations import activate
from .backends import get_backend
from .config import MoEConfig
from .dispatch import DispatchPlan


class Experts(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        E, D, F_ = cfg.num_experts, cfg.model_dim, cfg.expert_dim
        self.activation = cfg.activation
        self.backend = cfg.backend
        self.init = cfg.init
        self.init_std = cfg.init_std
        self.w1 = nn.Parameter(torch.empty(E, D, F_))
        self.w2 = nn.Parameter(torch.empty(E, F_, D))
        self.w3 = nn.Parameter(torch.empty(E, D, F_)) if cfg.activation == "swiglu" else None
        bias = cfg.expert_bias
        self.b1 = nn.Parameter(torch.empty(E, F_)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, D)) if bias else None
        self.b3 = nn.Parameter(torch.empty(E, F_)) if bias and self.w3 is not None else None
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert drawn independently (default), or, with ``init="identical"``, every expert
        a copy of the first, as the reference code's deep copies of one module are."""
        for w, b in ((self.w1, self.b1), (self.w3, self.b3), (self.w2, self.b2)):
            if w is None:
                continue
            if self.init_std is None:
                bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's default, fan_in = w.shape[1]
                nn.init.uniform_(w, -bound, bound)
                if b is not None:
                    nn.init.uniform_(b, -bound, bound)
            else:
                nn.init.normal_(w, std=self.init_std)
                if b is not None:
                    nn.init.zeros_(b)
            if self.init == "identical":
                w.copy_(w[:1].expand_as(w))
                if b is not None:
                    b.copy_(b[:1].expand_as(b))

    def hidden(self, up: Tensor, gate: Tensor | None) -> Tensor:
        """The activation between the projections; ``gate`` is x w3 + b3 for SwiGLU."""
        return activate(self.activation, up, gate)

    def forward(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """``out[t] = sum over kept pairs (t, e) of w_te * FFN_e(x_t)``: [T, D] -> [T, D] fp32."""
        return get_backend(self.backend, self, x_TD)(self, x_TD, plan)
