"""The live routing settings of one MoE layer, and the compute-budget controller that steers t.

``MoEConfig`` is what a layer was built with and never changes. The ``Dial`` is what the layer
runs with now: the threshold t (or a top-k router's k), the cap on experts per token, the
capacity factor of evaluation (the settings a user turns at inference: ``xmoe eval --threshold
0.7 --capacity``), and, when ``MoEConfig.target_experts`` is set, the state of a controller
that moves t during training.

The budget controller (a deviation from the paper, docs/method.md "A compute budget"): with a
fixed t a token's experts are variable but their mean drifts with the router's confidence (40 of
64 experts early in training, 1.2 once sharpened). With a budget ``k*`` the mean is held at k*
while each token still takes a variable number. Once per optimizer step, per layer:

    m     = wanted pairs / routed tokens        over the step's micro-batches and every rank
    e     = ln(k* / m)                          > 0: too few experts, raise t
    u     = logit(t) + K_P (e - e_prev) + K_I e, clamped to [-U_MAX, U_MAX]
    t     = sigmoid(u)                          so t never leaves (0, 1)

a PI controller in velocity form on the logit of t. The logit keeps t inside (0, 1) without a
clamp on t itself, and the log-ratio error makes the gains unitless: the same gains hold for a
budget of 1.5 or 8 experts. Velocity form keeps no integral that could wind up while u sits at
its clamp. The gains were chosen in a simulation of synthetic routers (soft, sharp, and
sharpening over training) where the mean came within 10% of k* in at most 12 steps; tests hold
the layer to a float64 simulation of the equations written out by hand.

State: a controlled t and e_prev are float64 buffers, saved with the weights, so a resumed run continues exactly;
the step's counts are buffers too, but not saved (they are zero after every update, which is
when checkpoints are written). They live on the layer's device: counting and updating read
nothing back to the host, in static mode too, and under data or expert parallelism the counts
of every rank are summed in one all-reduce per optimizer step for all layers together
(``step_budgets``), so every rank computes the same t.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import MoEConfig, check_threshold

K_P = 0.3  # proportional gain, per unit of ln(target / measured)
K_I = 0.5  # integral gain: the step in logit(t) per unit of ln(target / measured)
U_MAX = 12.0  # |logit(t)| at most: t in [6e-6, 1 - 6e-6]
_T_MIN = 1.0 / (1.0 + math.exp(U_MAX))  # sigmoid(-U_MAX)


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class Dial(nn.Module):
    """The live routing settings of one layer: t, a top-k router's ``top_k``, ``max_experts``,
    the evaluation capacity factor and the budget controller's state.

    A fixed t is a Python number. A controlled t is a float64 buffer with the controller's state,
    kept in float64 whatever the model's dtype (``model.half()`` must not round t to 8 bits and
    move routing decisions)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.kind = cfg.router
        self.top_k = cfg.top_k
        self.max_experts = cfg.max_experts
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.target_experts = cfg.target_experts
        if self.target_experts is None:
            self.threshold: float | Tensor = float(cfg.threshold)  # a number: nothing to save or move
        else:  # moved by the controller on the device, and saved with the weights
            self.register_buffer("threshold", torch.tensor(float(cfg.threshold), dtype=torch.float64))
            self.register_buffer("last_error", torch.zeros((), dtype=torch.float64))
            self.register_buffer("step_pairs", torch.zeros((), dtype=torch.float64), persistent=False)
            self.register_buffer("step_tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    @property
    def controlled(self) -> bool:
        return self.target_experts is not None

    def set_threshold(self, value: float) -> None:
        check_threshold(value)
        if self.controlled:
            self.threshold.fill_(float(value))  # the controller goes on from here if training resumes
        else:
            self.threshold = float(value)

    def observe(self, wanted_TE: Tensor) -> None:
        """Count the wanted pairs and tokens of one training call (no host read)."""
        self.step_pairs += wanted_TE.sum()
        self.step_tokens += wanted_TE.shape[0]

    def counts(self) -> Tensor:
        """[2]: this step's wanted pairs and tokens on this rank."""
        return torch.stack([self.step_pairs, self.step_tokens])

    def update(self, pairs: Tensor, tokens: Tensor) -> None:
        """One controller step from the step's pair and token counts (summed over ranks); a step
        that routed no token leaves everything as it was."""
        measured = pairs / tokens.clamp(min=1)
        error = torch.log(self.target_experts / measured.clamp(min=1e-12))
        error = torch.where(tokens > 0, error, self.last_error.new_zeros(()))
        # eps: a t set to 1 or more by hand (the dial at inference) enters at the clamp, not as inf.
        u = torch.logit(self.threshold, eps=_T_MIN) + K_P * (error - self.last_error) + K_I * error
        new_t = torch.sigmoid(u.clamp(-U_MAX, U_MAX))
        self.threshold.copy_(torch.where(tokens > 0, new_t, self.threshold))
        self.last_error.copy_(torch.where(tokens > 0, error, self.last_error))
        self.reset_counts()

    def reset_counts(self) -> None:
        """Forget this step's counts (after an update, or where a loader left the unsaved
        counters uninitialised)."""
        if self.controlled:
            self.step_pairs.zero_()
            self.step_tokens.zero_()

    def _apply(self, fn, recurse=True):
        # Follow the model to its device, never to its dtype (see the class docstring). ``fn`` is
        # tried on a float32 copy only to learn the device: a cast cannot round the buffers, and
        # MPS, which has no float64, gets float32.
        for name, buf in self._buffers.items():
            if buf is not None:
                device = fn(buf.float()).device
                self._buffers[name] = buf.to(device=device, dtype=_wide(device))
        return self

    def extra_repr(self) -> str:
        rule = f"top_k={self.top_k}" if self.kind == "topk" else f"threshold={float(self.threshold):.4g}"
        parts = [rule]
        if self.controlled:
            parts.append(f"target_experts={self.target_experts:g}")
        if self.max_experts is not None:
            parts.append(f"max_experts={self.max_experts}")
        parts.append(f"eval_capacity_factor={self.eval_capacity_factor}")
        return ", ".join(parts)


def budget_dials(model: nn.Module) -> list[Dial]:
    """The controlled dials of ``model``'s MoE layers, in module order."""
    return [m for m in model.modules() if isinstance(m, Dial) and m.controlled]


def step_budgets(model: nn.Module, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> None:
    """One controller step for every budgeted layer of ``model``, after an optimizer step.

    ``reduce`` sums a tensor over the ranks of a distributed run (``Ranks.sum_tensor``): one
    all-reduce of an [L, 2] tensor for all L layers, so every rank sets the same t. Nothing is
    read back to the host."""
    dials = budget_dials(model)
    if not dials:
        return
    counts = reduce(torch.stack([d.counts() for d in dials]))
    for dial, (pairs, tokens) in zip(dials, counts.to(dials[0].threshold.device), strict=True):
        dial.update(pairs, tokens)
