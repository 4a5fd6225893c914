"""Expert activations and their derivatives, shared by the experts and the fused backend.

``up`` is x W1 + b1; ``gate`` is x W3 + b3 (SwiGLU only, Shazeer 2020: silu(up) * gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def activate(kind: str, up: Tensor, gate: Tensor | None) -> Tensor:
    if kind == "gelu":
        return F.gelu(up)
    if kind == "gelu_tanh":
        return F.gelu(up, approximate="tanh")
    if kind == "relu":
        return F.relu(up)
    return F.silu(up) * gate


def activate_backward(kind: str, g_h: Tensor, up: Tensor, gate: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Gradients w.r.t. (up, gate), given the gradient ``g_h`` of ``activate(kind, up, gate)``."""
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(g_h, up), None
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g_h, up, approximate="tanh"), None
    if kind == "relu":
        return g_h * (up > 0), None
    return torch.ops.aten.silu_backward(g_h * gate, up), g_h * F.silu(up)
