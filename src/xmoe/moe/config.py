"""Configuration of one MoE layer.

Every field of the XMoE method (Yang et al., 2024, arXiv 2403.18926) is named here, and every
value is checked when the config is built, so a wrong setting fails at construction with a
message naming the field, not deep inside a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROUTERS = ("threshold", "topk")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
COMBINES = ("probs", "ones")
INITS = ("independent", "identical")
BACKENDS = ("auto", "loop", "fused", "grouped_mm", "triton", "direct")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer: E experts of width F on a model of width D, and how tokens pick them.

    Routing (see docs/method.md, "The routing rule, exactly"):
        router="threshold": each token takes the smallest prefix of its experts, sorted by
            router probability, whose probabilities add up to at least ``threshold``.
        router="topk": each token takes its ``top_k`` most probable experts (top_k=1 is Switch).
    Capacity: each expert keeps at most ``C = min(S, max(ceil(capacity_factor * S / E),
    min_capacity))`` of the S tokens of one call, by priority ``(K - rank) + p``.
    ``capacity_factor=None`` is dropless. In eval mode ``eval_capacity_factor`` applies instead
    (default None: dropless, so a token's output never depends on its neighbours).
    Combine: ``combine="probs"`` weighs each kept expert by its raw probability (the paper);
    ``combine="ones"`` adds the kept experts' outputs unweighted, so a dense FFN split into
    experts is reproduced exactly when every expert is engaged (the router then gets no gradient
    from the output, only from the balancing loss: fit it separately, as conversion does).
    Activations: gelu (exact erf), gelu_tanh (GPT-2's tanh approximation), relu, swiglu.
    ``max_experts`` caps the threshold rule at a token's K most probable experts (a deviation
    from the paper, off by default; docs/method.md). ``target_experts`` makes t a controlled
    variable (another deviation, off by default): during training a PI controller per layer moves
    t so that the mean experts per token tracks this budget, while each token still takes a
    variable number (xmoe.moe.dial; ``threshold`` is then t's starting value, and a start of 1 or
    more enters the controller at its upper clamp). ``static_shapes=True`` runs the layer with
    no host sync at all (CUDA graphs, ``torch.compile(fullgraph=True)``): the kept pairs are
    padded to a bound known from the shapes, so the rule must have one (a capacity factor in
    training and evaluation, a top-k router, or ``max_experts``). ``check_finite`` raises on
    non-finite router logits; None checks where it is free (riding on the layer's one host
    sync), that is, everywhere but in static mode.
    """

    model_dim: int
    num_experts: int
    expert_dim: int
    router: str = "threshold"
    threshold: float = 0.9
    top_k: int = 2  # the top-k router's k; for a threshold router, the top-k budget stats compare to
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    renormalize: bool = False
    combine: str = "probs"  # "ones": unit weights, y = sum of kept experts (dense -> MoE conversion)
    activation: str = "gelu"
    expert_bias: bool = True
    init: str = "independent"
    init_std: float | None = None
    max_experts: int | None = None  # threshold router: at most this many experts per token
    target_experts: float | None = None  # threshold router: steer t in training to this mean experts/token
    backend: str = "auto"
    static_shapes: bool = False
    check_finite: bool | None = None

    def __post_init__(self) -> None:
        for name in ("model_dim", "num_experts", "expert_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        _check_choice("router", self.router, ROUTERS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("combine", self.combine, COMBINES)
        if self.combine == "ones" and self.renormalize:
            raise ValueError("MoEConfig.renormalize=True has no effect with combine='ones'; drop one of them")
        _check_choice("init", self.init, INITS)
        _check_choice("backend", self.backend, BACKENDS)
        check_threshold(self.threshold)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"MoEConfig.top_k must be a positive integer, got {self.top_k!r}")
        if self.router == "topk" and self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} is larger than num_experts={self.num_experts}; "
                f"use top_k <= num_experts"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(
                    f"MoEConfig.{name} must be a positive finite number, or None for dropless "
                    f"routing; got {value!r}"
                )
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(
                f"MoEConfig.min_capacity must be a non-negative integer, got {self.min_capacity!r}"
            )
        self._check_max_experts_and_static()
        self._check_target_experts()
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(
                f"MoEConfig.init_std must be positive, or None for the nn.Linear default; "
                f"got {self.init_std!r}"
            )

    def _check_target_experts(self) -> None:
        if self.target_experts is None:
            return
        if self.router != "threshold":
            raise ValueError("MoEConfig.target_experts steers a threshold router's t; a top-k router takes top_k "
                             "experts per token already (drop target_experts or use router='threshold')")
        most = self.max_experts or self.num_experts
        value = self.target_experts
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1 <= value <= most:
            raise ValueError(f"MoEConfig.target_experts must be a number of experts per token in 1..{most} "
                             f"(max_experts or num_experts), or None for a fixed threshold; got {value!r}")

    def _check_max_experts_and_static(self) -> None:
        if self.max_experts is not None:
            if not _positive_int(self.max_experts) or self.max_experts > self.num_experts:
                raise ValueError(
                    f"MoEConfig.max_experts must be an integer in 1..num_experts={self.num_experts}, or None "
                    f"for no cap; got {self.max_experts!r}"
                )
            if self.router != "threshold":
                raise ValueError("MoEConfig.max_experts caps the threshold router; a top-k router is capped by top_k")
        if not self.static_shapes:
            return
        if self.check_finite:
            raise ValueError(
                "MoEConfig.check_finite=True needs a host sync, and static_shapes=True has none: set "
                "check_finite=None (checked where free) or False"
            )
        dropless = self.capacity_factor is None or self.eval_capacity_factor is None
        if self.router == "threshold" and self.max_experts is None and dropless:
            raise ValueError(
                "MoEConfig.static_shapes=True needs a bound on the kept pairs, and a dropless threshold "
                "router has none below tokens x experts: set max_experts (e.g. 8; a cap the paper does "
                "not have) or both capacity_factor and eval_capacity_factor"
            )

    @property
    def num_matrices(self) -> int:
        """Weight matrices per expert: two for GeLU/ReLU, three for SwiGLU."""
        return 3 if self.activation == "swiglu" else 2

    @property
    def flops_per_pair(self) -> int:
        """Forward multiply-add FLOPs of one expert on one token (2 per multiply-add)."""
        return 2 * self.model_dim * self.expert_dim * self.num_matrices


def check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0:
        raise ValueError(
            f"threshold must be a number > 0 (0.9 in the paper; >= 1 engages every expert), "
            f"got {threshold!r}"
        )
    if math.isnan(threshold):
        raise ValueError("threshold is NaN; use a number > 0")


def capacity(num_tokens: int, num_experts: int, factor: float | None, min_capacity: int) -> int | None:
    """Slots per expert, ``min(S, max(ceil(factor * S / E), min_capacity))``; None when dropless.

    The clamp to S is ours: the reference forgets it and crashes when a batch is smaller than
    the minimum capacity.
    """
    if factor is None:
        return None
    slots = factor * num_tokens / num_experts
    if slots >= num_tokens:  # also keeps ceil() away from an overflowing product
        return num_tokens
    # Rounded first, so that float noise (1.1 * 100 / 10 = 11.000000000000002) does not add a slot.
    return min(num_tokens, max(math.ceil(round(slots, 9)), min_capacity))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MoEConfig.{field}={value!r} is not one of {', '.join(choices)}")
