"""Partitions of an FFN's F hidden neurons into E groups of equal size G = F / E.

A partition is a LongTensor ``groups_EG`` [E, G]: row e lists the neurons of expert e, and every
neuron 0..F-1 appears exactly once. Two ways to make one:

- ``contiguous_partition``: neurons e*G .. (e+1)*G - 1 form expert e (no data needed).
- ``clustered_partition``: neurons that fire on the same tokens are put together, so that a
  token's active neurons fall in few experts and the rest can be skipped. This is MoEfication's
  co-activation clustering (Zhang et al., 2022, Sec. 3.1: balanced k-means over neurons). Here:
  each neuron is the vector of its activation magnitudes |h_j| over calibration tokens, scaled
  to unit length (so similarity = cosine of firing patterns); spherical k-means whose assignment
  step is balanced greedily (neurons in order of how strongly they prefer their best centroid,
  each to its most similar centroid that still has room).

Shape legend: T tokens, F neurons, E groups, G = F / E neurons per group.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xmoe.errors import UsageError

PARTITIONS = ("contiguous", "clustered")


def check_divides(d_ff: int, num_experts: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise UsageError(f"the number of experts must be a positive integer, got {num_experts!r}")
    if d_ff % num_experts:
        divisors = [e for e in range(2, min(d_ff, 128) + 1) if d_ff % e == 0]
        raise UsageError(
            f"{num_experts} experts do not divide the FFN width d_ff={d_ff} into equal groups; "
            f"pick a number of experts dividing it, e.g. one of {divisors[:12]}"
        )


def check_partition(groups_EG: Tensor, d_ff: int) -> None:
    """ValueError unless ``groups_EG`` puts every neuron 0..d_ff-1 in exactly one group."""
    if groups_EG.ndim != 2 or groups_EG.numel() != d_ff:
        raise UsageError(f"a partition must be [E, d_ff / E] = {d_ff} neurons, got shape {tuple(groups_EG.shape)}")
    if not torch.equal(groups_EG.reshape(-1).sort().values, torch.arange(d_ff, device=groups_EG.device)):
        raise UsageError("the partition does not list every neuron exactly once")


def contiguous_partition(d_ff: int, num_experts: int) -> Tensor:
    check_divides(d_ff, num_experts)
    return torch.arange(d_ff).reshape(num_experts, d_ff // num_experts)


def clustered_partition(h_TF: Tensor, num_experts: int, *, iterations: int = 30, seed: int = 0) -> Tensor:
    """Balanced co-activation clusters of the F neurons, from their activations ``h_TF`` on
    calibration tokens (row t = the hidden activations of the FFN on token t)."""
    F = h_TF.shape[1]
    check_divides(F, num_experts)
    features_FT = h_TF.detach().abs().double().T
    features_FT = features_FT / features_FT.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centroids_ET = _farthest_first(features_FT, num_experts, seed)
    assign_F = None
    for _ in range(iterations):
        new_assign_F = _balanced_assign((features_FT @ centroids_ET.T).numpy(), F // num_experts)
        if assign_F is not None and np.array_equal(new_assign_F, assign_F):
            break
        assign_F = new_assign_F
        centroids_ET = _centroids(features_FT, torch.from_numpy(assign_F), num_experts)
    groups_EG = torch.from_numpy(np.argsort(assign_F, kind="stable")).reshape(num_experts, -1)
    return groups_EG.sort(dim=1).values  # neurons in index order within a group: easier to read


def _farthest_first(features_FT: Tensor, k: int, seed: int) -> Tensor:
    """k starting centroids: a random neuron, then repeatedly the neuron least similar to the
    centroids chosen so far (spreads the starts over distinct firing patterns)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(features_FT.shape[0], (1,), generator=generator))]
    best_sim_F = features_FT @ features_FT[chosen[0]]
    for _ in range(k - 1):
        chosen.append(int(best_sim_F.argmin()))
        best_sim_F = torch.maximum(best_sim_F, features_FT @ features_FT[chosen[-1]])
    return features_FT[chosen].clone()


def _balanced_assign(sim_FE: np.ndarray, size: int) -> np.ndarray:
    """Each neuron to one of E clusters, every cluster exactly ``size`` neurons: neurons with the
    largest margin between their best and second-best cluster choose first."""
    F, E = sim_FE.shape
    top2 = np.sort(sim_FE, axis=1)[:, -2:] if E > 1 else np.concatenate([sim_FE, sim_FE], axis=1)
    order = np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")
    room = np.full(E, size)
    assign_F = np.empty(F, dtype=np.int64)
    for j in order:
        choice = int(np.argmax(np.where(room > 0, sim_FE[j], -np.inf)))
        assign_F[j] = choice
        room[choice] -= 1
    return assign_F


def _centroids(features_FT: Tensor, assign_F: Tensor, k: int) -> Tensor:
    sums_ET = torch.zeros(k, features_FT.shape[1], dtype=features_FT.dtype).index_add_(0, assign_F, features_FT)
    return sums_ET / sums_ET.norm(dim=1, keepdim=True).clamp_min(1e-12)
