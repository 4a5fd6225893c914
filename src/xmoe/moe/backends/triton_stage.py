"""The "triton" backend: the layer's stage through xmoe's Triton kernels (backends/triton_moe.py),
a local backend (it gathers and combines itself: backends/__init__.py).

Triton is optional (``pip install 'xmoe[triton]'``): nothing here imports it until the backend
is asked about or runs, and ``triton_problem`` says what is missing when it cannot.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ..experts import compute_dtype


def triton_problem(experts, x: Tensor) -> str | None:
    """Why the Triton kernels cannot run on x (in its compute dtype), or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed; pip install 'xmoe[triton]' (or use backend='auto')"
    from .triton_moe import triton_problem as problem

    return problem(torch.empty(0, device=x.device, dtype=compute_dtype(x)))


def triton_backend(experts, x_TD: Tensor, plan, dispatcher=None) -> Tensor:
    """The kept pairs of ``plan`` through their experts, weighted and summed per token: [T, D] fp32."""
    from .triton_moe import triton_moe

    dtype = compute_dtype(x_TD)
    w = experts.weights(dtype)
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return triton_moe(
            x_TD.to(dtype), plan.token_idx_N, plan.weight_N, plan.groups.offsets_E,
            w.w1, w.b1, w.w2, w.b2, w.w3, w.b3, experts.activation,
        )
