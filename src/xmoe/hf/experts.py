"""The "xmoe" experts implementation for transformers' MoE models: only the kept (token, expert)
pairs are computed, however many each token has.

transformers 5.x computes a MoE block's experts through ``ExpertsInterface`` (a function of
``hidden [T, D]``, ``top_k_index [T, K]``, ``top_k_weights [T, K]`` on the experts module, whose
weights are 3-D: ``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``). A threshold router gives
each token a variable number of experts in a fixed ``[T, K]`` by filling the unused slots with
weight 0 (xmoe.hf.adaptive points them at the token's first expert, so that every other
implementation computes them harmlessly; a sentinel index outside [0, E) is accepted too). This
implementation drops those slots before any compute, so a token with 2 experts costs 2 experts:
a pair of weight 0 adds nothing to its token.

The computation (as MegaBlocks and ScatterMoE do it, on plain torch): sort the kept pairs by
expert, run one GEMM chain per expert on its contiguous slice of rows, weigh each row by its
routing weight and add it back to its token in fp32. One host sync per call (the per-expert row
counts, to slice the groups).

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K slots per token,
N kept pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXPERTS_IMPLEMENTATION = "xmoe"  # the name to pass as experts_implementation=


def xmoe_experts_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                         top_k_weights: Tensor) -> Tensor:
    """``sum_k top_k_weights[t, k] * expert_{top_k_index[t, k]}(hidden_states[t])`` over the slots
    with a nonzero weight whose index is a real expert (the others are skipped): [T, D], in the
    input's dtype."""
    x_TD = hidden_states
    T, K = top_k_index.shape
    E = experts.num_experts
    # Skipped slots all go to bucket E, which sorts last and is never computed.
    runs_TK = (top_k_index >= 0) & (top_k_index < E) & (top_k_weights != 0)
    expert_TK = torch.where(runs_TK, top_k_index, E)
    order_TK = expert_TK.reshape(-1).argsort(stable=True)
    counts = torch.bincount(expert_TK.reshape(-1), minlength=E + 1)[:E].tolist()  # the one host sync
    pair_N = order_TK[: sum(counts)]
    token_N = pair_N // K
    x_ND = x_TD.index_select(0, token_N)
    y_ND = _expert_chains(experts, x_ND, counts)
    # fp32 accumulation: a token's experts are summed in full precision whatever the model's dtype.
    weight_N1 = top_k_weights.reshape(-1).index_select(0, pair_N).float().unsqueeze(1)
    y_TD = x_TD.new_zeros(T, x_TD.shape[1], dtype=torch.float32).index_add_(0, token_N, y_ND.float() * weight_N1)
    return y_TD.to(x_TD.dtype)


def _expert_chains(experts: nn.Module, x_ND: Tensor, counts: list[int]) -> Tensor:
    """Rows of x_ND sorted by expert, ``counts[e]`` of them for expert e: each expert's MLP on
    its own slice (weights split once with unbind, not indexed per expert, for autograd's sake)."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    up_bias = _bias(experts, "gate_up_proj_bias" if experts.has_gate else "up_proj_bias")
    down_bias = _bias(experts, "down_proj_bias")
    ups, downs = up.unbind(0), experts.down_proj.unbind(0)
    y_ND = x_ND.new_empty(x_ND.shape)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        h = _linear(x_ND[rows], ups[e], up_bias, e, experts.is_transposed)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        y_ND[rows] = _linear(h, downs[e], down_bias, e, experts.is_transposed)
        start += n
    return y_ND


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, e: int, transposed: bool) -> Tensor:
    """x @ w.T for transformers' [out, in] layout, x @ w for its transposed [in, out] one."""
    y = x @ w if transposed else F.linear(x, w)
    return y if bias is None else y + bias[e]


def _bias(experts: nn.Module, name: str) -> Tensor | None:
    return getattr(experts, name) if getattr(experts, "has_bias", False) else None

