"""The threshold rule on a pretrained router: what every family shares.

A family's router (transformers' ``*TopKRouter``) scores the experts, picks its top k and weighs
them. The threshold version keeps the scoring and the weighing and replaces the pick: each token
keeps the smallest prefix of its candidates, ranked by the family's normalised score (its
"mass", summing to 1 over the candidates), whose mass reaches t (``threshold_prefix``, the rule
of xmoe's own layer), at most ``max_experts``. The candidates are all E experts for a softmax
over all of them, or the k the family itself picks when its weights are normalised over those k
only. Ties go to the lower expert index.

The router is adapted in place by changing its class to a subclass of its own that mixes in a
``ThresholdRouter`` (what ``torch.nn.utils.parametrize`` does to a parametrised module): its
parameters, buffers and state-dict keys stay; ``isinstance`` against the family's class still
holds, so transformers' ``OutputRecorder`` records its logits (``output_router_logits=True``),
and hooks already on the module stay on it.

The outputs keep the family's meaning: ``(scores [T, E], weights [T, K], index [T, K])`` with K
the most experts a token of the call keeps. A token that keeps fewer fills its other slots with
its first expert at weight 0: every experts implementation computes them correctly (0 times a
finite output adds nothing), and the "xmoe" one skips them, so they cost nothing there.

Shape legend: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xmoe.errors import UsageError
from xmoe.moe.router import threshold_prefix


@dataclass(frozen=True)
class Scores:
    """What a family's router computes before it picks, for every expert."""

    output_TE: Tensor  # the router's first output (its logits; Gemma-4's probabilities), returned as is
    value_TE: Tensor  # each expert's weight before any normalisation over the kept set
    mass_TE: Tensor  # fp32, sums to 1 over the candidates; -inf for an expert the family never picks


class ThresholdRouter(nn.Module):
    """Mixed in before a family's router class (see ``adapt_router``); a subclass per router kind
    says how the family scores (``score``) and weighs (``weigh``) its experts."""

    threshold: float
    max_experts: int | None  # None: every candidate
    own_top_k_only = False  # True: the candidates are the k experts the family picks, not all E

    def candidates(self) -> int:
        """How many experts a token can keep: E, or the family's own k when it weighs only those.
        (Reads only the family router's attributes: callable on an unadapted router too.)"""
        raise NotImplementedError

    def own_top_k(self) -> int:
        """The family's k (same caveat as ``candidates``)."""
        return self.top_k

    def score(self, hidden_states: Tensor) -> Scores:
        """The family's scores of every expert for ``hidden_states`` ([..., D], flattened to T)."""
        raise NotImplementedError

    def weigh(self, value_TK: Tensor, index_TK: Tensor, scores: Scores) -> Tensor:
        """The family's weights of the kept experts from their values, which are 0 in unused
        slots (and stay 0: every family's weighing scales or renormalises them)."""
        raise NotImplementedError

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scores = self.score(hidden_states)
        cap = min(self.max_experts or self.candidates(), self.candidates())
        # A stable sort, so that ties go to the lower expert index, as in xmoe's layer.
        mass_TE, index_TE = scores.mass_TE.sort(dim=-1, descending=True, stable=True)
        mass_TK, index_TK = mass_TE[:, :cap], index_TE[:, :cap]
        kept_TK = threshold_prefix(mass_TK, self.threshold)
        width = int(kept_TK.sum(dim=1).max()) if kept_TK.shape[0] else 1  # a host sync; kept is a prefix
        kept_TK, index_TK = kept_TK[:, :width], index_TK[:, :width]
        value_TK = scores.value_TE.gather(1, index_TK).masked_fill(~kept_TK, 0.0)
        weights_TK = self.weigh(value_TK, index_TK, scores)
        return scores.output_TE, weights_TK, torch.where(kept_TK, index_TK, index_TK[:, :1])

    def train(self, mode: bool = True) -> ThresholdRouter:
        if mode:
            raise UsageError(
                "a model adapted by xmoe.hf.adaptive routes for inference only (its threshold rule has no "
                "gradient path or balancing loss); to train, load the model again with from_pretrained"
            )
        return super().train(False)

    def extra_repr(self) -> str:
        cap = "None (all candidates)" if self.max_experts is None else self.max_experts
        return f"threshold={self.threshold}, max_experts={cap}, candidates={self.candidates()}"


def check_adaptable(router: nn.Module) -> None:
    """Refuse a router whose ``forward`` is replaced on the instance, unless by accelerate's hooks
    (``_hooked``) or by its own class's forward (what removing those hooks leaves): a new class
    would not run."""
    if "forward" in vars(router) and not _hooked(router) and not _own_forward(router):
        raise UsageError(
            f"{type(router).__name__}.forward is replaced on the module itself, so a threshold rule would "
            f"never run; remove that replacement before xmoe.hf.adaptive (accelerate's hooks, as device_map "
            f"offloading adds, are followed)"
        )


def adapt_router(router: nn.Module, rule: type[ThresholdRouter], *, threshold: float,
                 max_experts: int | None) -> None:
    """Route ``router`` (a family's router, or one adapted before) by ``rule`` at ``threshold``."""
    if _own_forward(router):  # accelerate's hooks removed: the class's forward, bound; the class decides
        del router.forward
    if not isinstance(router, ThresholdRouter):
        router.__class__ = _threshold_class(rule, type(router))
        if _hooked(router):  # the hooks call the forward they wrapped: now the rule's
            router._old_forward = types.MethodType(type(router).forward, router)
    router.threshold, router.max_experts = threshold, max_experts
    router.train(False)


def _own_forward(router: nn.Module) -> bool:
    """Whether the instance's ``forward`` is its class's own, bound to it (accelerate's
    remove_hook_from_module leaves the forward it had wrapped there)."""
    forward = vars(router).get("forward")
    return getattr(forward, "__self__", None) is router and getattr(forward, "__func__", None) is type(router).forward


def _hooked(router: nn.Module) -> bool:
    """Whether accelerate's hooks wrap the router's forward (offloading, device_map): they replace
    ``forward`` on the instance by one that moves the weights in, then calls ``_old_forward``,
    the forward they wrapped (accelerate.hooks.add_hook_to_module)."""
    return hasattr(router, "_hf_hook") and "_old_forward" in vars(router)


@functools.cache  # one class per (rule, family): the adapted routers of a model share it
def _threshold_class(rule: type[ThresholdRouter], family: type[nn.Module]) -> type[nn.Module]:
    return type(f"Threshold{family.__name__}", (rule, family), {"__module__": rule.__module__})


def renormalized(value_TK: Tensor, eps: float = 0.0) -> Tensor:
    """Each row divided by its sum: weights normalised over the kept experts."""
    return value_TK / (value_TK.sum(dim=-1, keepdim=True) + eps)


def candidate_scores(output_TE: Tensor, value_TK: Tensor, index_TK: Tensor, mass_TK: Tensor) -> Scores:
    """Scores of a family that picks k candidates itself: values and mass of the candidates at
    ``index_TK``, the other experts never picked (mass -inf)."""
    value_TE = torch.zeros_like(output_TE, dtype=value_TK.dtype).scatter(1, index_TK, value_TK)
    mass_TE = torch.full_like(output_TE, -torch.inf, dtype=torch.float32).scatter(1, index_TK, mass_TK.float())
    return Scores(output_TE, value_TE, mass_TE)
