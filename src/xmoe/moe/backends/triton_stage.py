"""The "triton" backend: the layer's stage through xmoe's Triton kernel (backends/triton_moe.py).

Triton is optional (``pip install 'xmoe[triton]'``): nothing here imports it until the backend
runs, and ``triton_problem`` says what is missing when it cannot.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .grouped import compute_dtype

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_problem(experts, x: Tensor) -> str | None:
    """Why the Triton kernel cannot run on x, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed; pip install 'xmoe[triton]' (or use backend='auto')"
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel runs on CUDA GPUs (on CPU only under TRITON_INTERPRET=1, for tests); use backend='fused' on CPU"
    if x.device.type not in ("cuda", "cpu"):
        return f"the Triton kernel does not run on {x.device.type}; use backend='loop'"
    if compute_dtype(x) not in DTYPES:
        return f"the Triton kernel takes float32, float16 or bfloat16, not {compute_dtype(x)}"
    return None


def triton_backend(experts, x_TD: Tensor, plan) -> Tensor:
    """The kept pairs of ``plan`` through their experts, weighted and summed per token: [T, D] fp32."""
    from .triton_moe import triton_moe

    dtype = compute_dtype(x_TD)
    w = experts.weights(dtype)
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return triton_moe(
            x_TD.to(dtype), plan.token_idx_N, plan.weight_N, plan.groups.offsets_E,
            w.w1, w.b1, w.w2, w.b2, w.w3, w.b3, experts.activation,
        )
