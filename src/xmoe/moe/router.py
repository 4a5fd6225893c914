"""Routers: which experts each token wants, and which of those pairs capacity lets through.

Implements the routing rule of XMoE (Yang et al., 2024, arXiv 2403.18926, Sec. 3), written out
in docs/method.md:

    p = softmax(W_g x)                          in fp32, whatever the input dtype
    rank j of the sorted p is wanted   iff  j == 1  or  p(1) + ... + p(j-1) < t
    capacity  C = min(S, max(ceil(gamma * S / E), m))
    priority of (token, expert)  =  (K - r) + p_e       r: the expert's 0-based rank for the token,
                                                        K: the most experts any token wants
    combine weight = p_e (raw probability; ``renormalize`` divides by the wanted mass;
                          ``combine="ones"`` uses 1 for every kept pair)

and the top-k baseline (GShard-like; top_k=1 is Switch) with the same capacity machinery.

A small call at inference on a CPU is decided on the host instead (``host_decision``, from the
probabilities read there; decode.py): the same pairs and weights, as Python numbers
(``HostDecision``), which decoding groups by expert (decode.run_experts, decode.HostPlan).

Shapes: T tokens, D model dim, E experts. Ties between equal probabilities go to the lower
expert index; ties between equal priorities at a full expert go to the earlier token.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig, capacity
from .dial import Dial


@dataclass(frozen=True)
class HostDecision:
    """A small call's decision taken on the host (``host_decision``): each token's kept experts,
    most probable first, and their combine weights, as Python numbers. Capacity drops none of
    these pairs (a call where it would is decided on tensors); decoding groups them by expert
    (decode.run_experts, decode.HostPlan)."""

    experts: tuple[tuple[int, ...], ...]  # per token: its kept experts
    weights: tuple[tuple[float, ...], ...]  # per token: their combine weights

    @property
    def num_tokens(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class RouterOutput:
    """The routing decision for T tokens: dense [T, E] masks, small next to the activations.

    A small call decided on the host (``host``) builds its masks only when they are read:
    decoding, which reads none of them, runs from ``host`` alone.
    """

    logits_TE: Tensor  # fp32 router logits
    probs_TE: Tensor  # fp32 softmax over all experts
    capacity: int | None  # slots per expert in this call; None when dropless
    masks: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)  # (wanted, kept, weights)
    host: HostDecision | None = field(default=None, repr=False)  # the kept pairs on the host

    @property
    def wanted_TE(self) -> Tensor:
        """bool: the router picked this pair (before capacity)."""
        return (self.masks or self._host_masks)[0]

    @property
    def kept_TE(self) -> Tensor:
        """bool: the pair survived capacity and will be computed."""
        return (self.masks or self._host_masks)[1]

    @property
    def weights_TE(self) -> Tensor:
        """fp32 combine weights (what each expert's output is multiplied by), 0 where not kept."""
        return (self.masks or self._host_masks)[2]

    @functools.cached_property  # kept in the instance's __dict__: a cache, which frozen allows
    def _host_masks(self) -> tuple[Tensor, Tensor, Tensor]:
        """The masks of a host decision, built on first read."""
        # A host decision is taken only where capacity drops nothing: wanted = kept.
        probs_TE, host = self.probs_TE, self.host
        tokens = [t for t, experts in enumerate(host.experts) for _ in experts]
        experts = [e for experts in host.experts for e in experts]
        index = (probs_TE.new_tensor(tokens, dtype=torch.long), probs_TE.new_tensor(experts, dtype=torch.long))
        kept_TE = torch.zeros_like(probs_TE, dtype=torch.bool).index_put_(index, probs_TE.new_ones((), dtype=torch.bool))
        weights = probs_TE.new_tensor([w for weights in host.weights for w in weights])
        weights_TE = torch.zeros_like(probs_TE).index_put_(index, weights)
        return kept_TE, kept_TE, weights_TE


def threshold_prefix(sorted_p_TK: Tensor, threshold: float | Tensor, max_experts: int | None = None) -> Tensor:
    """The threshold rule, defined here once: which of each token's experts, given from most to
    least probable (``sorted_p_TK``, all E of them or the first K), the token wants.

    Rank j (0-based) is wanted iff ``j == 0`` or ``p(0) + ... + p(j-1) < t``: the exclusive
    cumulative sum, a strict ``<``, so the expert whose mass reaches t is taken and at least one
    always is. ``t >= 1`` takes every expert, exactly. ``max_experts`` keeps ranks below it only.
    ``threshold`` is a number or a 0-d tensor (a controlled t, read on the device).

    Worked example, t = 0.9, sorted p = [0.60, 0.25, 0.10, 0.03, 0.02]: exclusive sums
    [0, 0.60, 0.85, 0.95, 0.98] -> ranks 0, 1, 2 are wanted (0.85 < 0.9 still lets the third
    in, whose mass reaches 0.95). With ``max_experts=2``, ranks 0 and 1 only.
    """
    K = sorted_p_TK.shape[-1]
    if isinstance(threshold, Tensor) or threshold < 1.0:
        # The exclusive sum in fp64 where the device has it, so that the strict `< t` test does
        # not flip on fp32 rounding of a long cumulative sum.
        acc_TK = sorted_p_TK.cumsum(dim=-1, dtype=_wide_dtype(sorted_p_TK.device))
        exclusive_TK = torch.cat([torch.zeros_like(acc_TK[:, :1]), acc_TK[:, :-1]], dim=-1)
        wanted_TK = exclusive_TK < threshold  # rank 0 always: its exclusive sum is 0 < t
        if isinstance(threshold, Tensor):  # the fp sum of E probabilities may stop just short of 1
            wanted_TK |= threshold >= 1.0
    else:
        wanted_TK = torch.ones_like(sorted_p_TK, dtype=torch.bool)
    if max_experts is not None and max_experts < K:
        wanted_TK &= torch.arange(K, device=sorted_p_TK.device) < max_experts
    return wanted_TK


def threshold_mask(probs_TE: Tensor, threshold: float | Tensor, max_experts: int | None = None) -> tuple[Tensor, Tensor]:
    """Wanted pairs of the threshold rule (``threshold_prefix``) from a full stable sort, so ties
    go to the lower expert index; and each token's experts from most to least probable."""
    sorted_p, order_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
    return _unsort(threshold_prefix(sorted_p, threshold, max_experts), order_TE), order_TE


def topk_mask(probs_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Wanted pairs of the top-k rule (the k most probable experts), and the expert order."""
    order_TE = probs_TE.sort(dim=-1, descending=True, stable=True).indices
    wanted_sorted = torch.arange(order_TE.shape[-1], device=order_TE.device) < k
    return _unsort(wanted_sorted.expand_as(order_TE), order_TE), order_TE


def apply_capacity(
    probs_TE: Tensor, wanted_TE: Tensor, order_TE: Tensor | None, slots: int | None, *, shortcut: bool = True
) -> Tensor:
    """Keep, for each expert, its ``slots`` wanted pairs of highest priority ``(K - r) + p``.

    K is the same for every pair of the call, so the order is: all first choices before any
    second choice, and within a rank, higher probability first. No position bias, no noise.
    ``order_TE`` is each token's experts from most to least probable (the second result of
    ``threshold_mask``/``topk_mask``); None sorts here, only if some expert overflows.
    ``shortcut=False`` never branches on the data (static mode: nothing may read the device).
    """
    if slots is None or wanted_TE.shape[0] == 0:
        return wanted_TE
    if shortcut and probs_TE.device.type == "cpu" and wanted_TE.sum(dim=0).max() <= slots:
        # Nothing overflows, as is usual at the paper's gamma = 8. Reading the loads is free on
        # the CPU; on a GPU it would be a host sync, dearer than the sort it saves.
        return wanted_TE
    if order_TE is None:
        order_TE = probs_TE.sort(dim=-1, descending=True, stable=True).indices
    wide = _wide_dtype(probs_TE.device)  # p must not be rounded away next to an integer K - r
    max_wanted = wanted_TE.sum(dim=-1).max()
    ranks_TE = _ranks(order_TE)  # r: 0 for each token's most probable expert
    priority_TE = (max_wanted - ranks_TE).to(wide) + probs_TE.to(wide)
    priority_TE = priority_TE.masked_fill(~wanted_TE, float("-inf"))
    queue_ET = priority_TE.T.sort(dim=-1, descending=True, stable=True).indices
    position_TE = _ranks(queue_ET).T  # place of each token in its expert's queue
    return wanted_TE & (position_TE < slots)


CANDIDATES = 8  # experts the CPU fast path examines per token before it falls back to a sort


def wanted_pairs(
    probs_TE: Tensor, kind: str, threshold: float | Tensor, k: int, max_experts: int | None = None, *,
    fast: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The router's wanted pairs, and the expert order when it was computed on the way.

    The one place that picks how the rule is evaluated. The rules themselves are defined once,
    by ``threshold_prefix`` and ``topk_mask``; the fast path below gives exactly their decisions
    (for finite probabilities: NaN rows, possible only with ``check_finite=False``, are decided
    arbitrarily), and a property test holds it to them.

    The fast path is for the CPU, where sorting all E probabilities of every token is the
    dearest step of routing (benchmarks/README.md): the decision is read from each token's top
    ``CANDIDATES + 1`` experts instead. A token falls back to the full stable sort when its top
    experts hold a tie (whose order ``topk`` leaves undefined) that could change the decision,
    or, for the threshold rule, when its wanted prefix does not end within the candidates. The
    fallback is a data-dependent branch (a host sync): free on a CPU, so elsewhere, and with
    ``fast=False`` (static mode, where nothing may branch on the data), the sort runs.
    """
    if not fast or probs_TE.device.type != "cpu":
        if kind == "threshold":
            return threshold_mask(probs_TE, threshold, max_experts)
        return topk_mask(probs_TE, k)
    E = probs_TE.shape[-1]
    threshold = float(threshold)  # on the CPU, reading a tensor t costs nothing
    if kind == "threshold" and threshold >= 1.0 and max_experts is None:
        return torch.ones_like(probs_TE, dtype=torch.bool), None
    cap = E if max_experts is None else max_experts
    n = min(E, CANDIDATES if kind == "threshold" else k)  # candidates decided here
    if kind == "threshold" and cap <= n:
        n = cap  # nothing past the cap can be wanted
    top_p, top_idx = probs_TE.topk(min(E, n + 1), dim=-1)  # descending; ties in no set order
    if kind == "threshold":
        wanted_top = threshold_prefix(top_p, threshold, cap)
        # A tie among the candidates: only one across the wanted boundary could change the set
        # (the sums do not depend on the order of equal values), but any tie is rare enough
        # to send to the sort.
        unsure = (top_p[:, 1:] == top_p[:, :-1]).any(dim=-1)
        if n < E and n < cap:
            unsure |= wanted_top[:, n]  # the prefix goes on past the candidates
    else:
        wanted_top = (torch.arange(top_p.shape[-1], device=top_p.device) < n).expand_as(top_p)
        # Only a tie across the k-th place changes the set.
        unsure = top_p[:, n - 1] == top_p[:, n] if n < E else torch.zeros_like(top_p[:, 0], dtype=torch.bool)
    wanted_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(-1, top_idx[:, :n], wanted_top[:, :n])
    rows = unsure.nonzero().squeeze(1)
    if rows.numel():
        slow = threshold_mask(probs_TE[rows], threshold, max_experts) if kind == "threshold" else topk_mask(probs_TE[rows], k)
        wanted_TE[rows] = slow[0]
    return wanted_TE, None


def host_decision(
    rows: list[list[float]], kind: str, threshold: float | Tensor, k: int, max_experts: int | None,
    slots: int | None, ones: bool,
) -> HostDecision | None:
    """A small call's decision taken on the host from its probabilities read there (``rows``, one
    list of E per token): the pairs of ``threshold_prefix`` / ``topk_mask`` (a property test holds
    it to them) and their combine weights (``p``, or 1 with ``ones``), no [T, E] tensor.

    For the CPU, where reading the probabilities costs nothing, and a few tokens, where each op
    of the tensor path costs more than a Python loop over the tokens. A token's experts are
    ordered as the rule's stable sort orders them, by descending p and equal ones by expert
    index (Python's sort is stable), so ties are decided here too. None only where capacity
    would drop a pair (an expert wanted by more tokens than its ``slots``): the priority order
    then decides who is dropped, and the caller decides on tensors.
    """
    E = len(rows[0])
    most = min(k, E) if kind == "topk" else min(max_experts or E, E)  # the most experts a token may take
    threshold = float(threshold)
    experts, weights = [], []
    for p in rows:
        if most == 1:
            kept = [max(range(E), key=p.__getitem__)]  # the first of equal maxima: the lowest index
        else:
            order = sorted(range(E), key=p.__getitem__, reverse=True)  # stable, also reversed
            kept = order[:most if kind == "topk" else _prefix_length(map(p.__getitem__, order), threshold, most)]
        experts.append(tuple(kept))
        weights.append((1.0,) * len(kept) if ones else tuple(map(p.__getitem__, kept)))
    # An expert has at most one pair per token: only fewer slots than tokens can drop one.
    if slots is not None and slots < len(experts) and max(Counter(e for row in experts for e in row).values()) > slots:
        return None
    return HostDecision(tuple(experts), tuple(weights))


def non_finite_error() -> FloatingPointError:
    """What a layer call raises when a router logit is NaN or Inf (MoELayer, decode.py)."""
    return FloatingPointError(
        "MoE router logits contain NaN or Inf, so no routing decision is meaningful; the input "
        "or the router weights have diverged (lower the learning rate, check for fp16 overflow). "
        "This check costs nothing extra in forward (it rides on the layer's one host sync); "
        "MoEConfig(check_finite=False) turns it off."
    )


def gate_logits(x_TD: Tensor, weight: Tensor) -> Tensor:
    """The router's logits ``x W_g^T``, in fp32 whatever the input dtype. Routing decisions are
    discontinuous in p; bf16 logits would move tokens between experts. Autocast is switched off
    so the gate really runs in fp32 (entered only when on: at one token per call, every op of
    the router shows in the layer's time)."""
    device = x_TD.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return F.linear(x_TD.float(), weight.float())
    return F.linear(x_TD.float(), weight.float())


def _prefix_length(sorted_p: Iterable[float], threshold: float, limit: int) -> int:
    """How many of the first ``limit`` places of a token's ``sorted_p`` (descending) the threshold
    rule wants (``threshold_prefix``): place j iff j == 0 or p[0] + ... + p[j-1] < t, summed in
    the same order and precision (float64) as there, so every comparison comes out the same."""
    if threshold >= 1.0:
        return limit
    mass, j = 0.0, 1
    for p in sorted_p:  # p[j - 1]
        if j >= limit:
            break
        mass += p
        if not mass < threshold:
            break
        j += 1
    return j


class Router(nn.Module):
    """Linear gate ``W_g`` [E, D] without bias, and the rule that turns its scores into pairs.

    The rule's fixed settings are read from the config the router was built with (``cfg``);
    the live ones (t or a top-k router's k, ``max_experts``, the evaluation capacity, a budget
    controller's state) from its ``dial``, so a built model's compute can be dialled at inference (``router.threshold =
    0.7``) without rebuilding it, and the config never goes stale.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.model_dim))
        self.dial = Dial(cfg)
        # host_decision can decide for it: static mode reads nothing, renormalized weights are left to the tensors.
        self._host_rule = not cfg.static_shapes and not cfg.renormalize
        self._weight_t: tuple | None = None  # (the weight's address, its transpose) of weight_t
        self.reset_parameters()

    @property
    def kind(self) -> str:
        return self.cfg.router

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def threshold(self) -> float:
        """The live t (a host read of the dial's buffer: for the Python API, not the hot path)."""
        return float(self.dial.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.dial.set_threshold(value)

    def reset_parameters(self) -> None:
        if self.cfg.init_std is None:
            bound = self.weight.shape[1] ** -0.5  # nn.Linear's default range
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.normal_(self.weight, std=self.cfg.init_std)

    def weight_t(self) -> Tensor:
        """``weight.T`` [D, E], a view kept between calls (no autograd), for decoding's gate
        ``x @ weight_t()`` (decode.py): one op where ``F.linear`` makes two, a transpose and the
        GEMM, each ~10 µs right after a weight stream. Keyed on the weight's address and shape, as
        Experts.per_expert's views are: the kept view keeps the storage alive, so a new weight
        (``.data``, ``.to()``) cannot take the same address, and one that is a slice of the old
        (fewer experts) has another shape."""
        weight = self._parameters["weight"]
        key = (weight.data_ptr(), weight.shape)
        if self._weight_t is None or self._weight_t[0] != key:
            self._weight_t = (key, weight.detach().t())
        return self._weight_t[1]

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle: a view is not state
        return {**self.__dict__, "_weight_t": None}

    def forward(self, x_TD: Tensor) -> RouterOutput:
        """The decision for [T, D] tokens (decoding's calls are decided on the host instead,
        decode.py, by ``host_decision``)."""
        logits_TE = gate_logits(x_TD, self.weight)
        probs_TE = logits_TE.softmax(dim=-1)
        cfg, dial = self.cfg, self.dial
        factor = cfg.capacity_factor if self.training else dial.eval_capacity_factor
        slots = capacity(x_TD.shape[0], self.num_experts, factor, cfg.min_capacity)
        with torch.no_grad():
            wanted_TE, order_TE = wanted_pairs(
                probs_TE, cfg.router, dial.threshold, dial.top_k, dial.max_experts, fast=not cfg.static_shapes
            )
            if self.training and dial.controlled:
                dial.observe(wanted_TE)
            kept_TE = apply_capacity(probs_TE, wanted_TE, order_TE, slots, shortcut=not cfg.static_shapes)
        weights_TE = probs_TE
        if cfg.combine == "ones":
            weights_TE = torch.ones_like(probs_TE)
        elif cfg.renormalize:
            weights_TE = probs_TE / (probs_TE * wanted_TE).sum(dim=-1, keepdim=True)
        weights_TE = weights_TE * kept_TE
        return RouterOutput(logits_TE, probs_TE, slots, masks=(wanted_TE, kept_TE, weights_TE))

    def max_pairs(self, num_tokens: int) -> int:
        """The most (token, expert) pairs a call of ``num_tokens`` tokens can keep, with the
        router's live settings: the size static mode pads to. min(T * the experts a token may
        take, E * C), C the capacity of this mode (training or evaluation)."""
        cfg, dial, E = self.cfg, self.dial, self.num_experts
        per_token = min(dial.top_k, E) if cfg.router == "topk" else (dial.max_experts or E)
        factor = cfg.capacity_factor if self.training else dial.eval_capacity_factor
        slots = capacity(num_tokens, E, factor, cfg.min_capacity)
        return num_tokens * per_token if slots is None else min(num_tokens * per_token, E * slots)

    def extra_repr(self) -> str:
        return f"{self.cfg.router}, experts={self.num_experts}, capacity_factor={self.cfg.capacity_factor}"


def _ranks(order: Tensor) -> Tensor:
    """Inverse permutation along the last dim: ``ranks[i, order[i, j]] = j``."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _unsort(values_sorted: Tensor, order: Tensor) -> Tensor:
    return torch.empty_like(values_sorted).scatter_(-1, order, values_sorted)


def _wide_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no fp64
