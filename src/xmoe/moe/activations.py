"""Expert activations and their derivatives, shared by the experts and the fused backend.

``up`` is x W1 + b1; ``gate`` is x W3 + b3 (SwiGLU only, Shazeer 2020: silu(up) * gate).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor


# The activations that take no gate, each one torch function of ``up`` (no Python call of
# its own: the decoding path calls them between GEMMs, decode.py).
ELEMENTWISE = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": torch.relu}


def activate(kind: str, up: Tensor, gate: Tensor | None) -> Tensor:
    elementwise = ELEMENTWISE.get(kind)
    return F.silu(up) * gate if elementwise is None else elementwise(up)


def activate_backward(kind: str, g_h: Tensor, up: Tensor, gate: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Gradients w.r.t. (up, gate), given the gradient ``g_h`` of ``activate(kind, up, gate)``."""
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(g_h, up), None
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g_h, up, approximate="tanh"), None
    if kind == "relu":
        return g_h * (up > 0), None
    return torch.ops.aten.silu_backward(g_h * gate, up), g_h * F.silu(up)
