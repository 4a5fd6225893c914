"""Partitions of FFN neurons: balanced permutations; clustering finds planted co-activation groups."""

from __future__ import annotations

import pytest
import torch

from xmoe.conversion import check_partition, clustered_partition, contiguous_partition


def assert_balanced_permutation(groups, d_ff, num_experts):
    rows = groups.tolist()
    assert len(rows) == num_experts and all(len(r) == d_ff // num_experts for r in rows)
    seen = [0] * d_ff
    for row in rows:
        for j in row:
            seen[j] += 1
    assert seen == [1] * d_ff  # every neuron in exactly one group


def test_contiguous_partition_is_the_slices():
    groups = contiguous_partition(12, 3)
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_clustered_partition_is_balanced_on_random_activations():
    h = torch.randn(300, 64)
    assert_balanced_permutation(clustered_partition(h, 8), 64, 8)


def test_clustered_partition_recovers_planted_coactivation_groups():
    # 4 hidden groups of 8 neurons, scattered by a random permutation. Each token switches on
    # one group (the others stay near 0): neurons fire together exactly within their group.
    E, G, T = 4, 8, 400
    planted = torch.randperm(E * G).reshape(E, G)
    which = torch.randint(E, (T,))
    h = 0.02 * torch.randn(T, E * G)
    for t in range(T):
        h[t, planted[which[t]]] += 1.0 + torch.rand(G)
    found = clustered_partition(h, E)
    assert_balanced_permutation(found, E * G, E)
    assert {frozenset(r) for r in found.tolist()} == {frozenset(r) for r in planted.tolist()}


def test_clustered_partition_stays_balanced_when_the_natural_clusters_are_not():
    # 12 neurons fire together, 4 others fire together: k-means alone would make groups of 12
    # and 4; the balanced clustering must make two groups of 8, keeping the 4 together.
    big, small = torch.arange(12), torch.arange(12, 16)
    h = 0.01 * torch.rand(200, 16)
    h[:100, big] += 1.0
    h[100:, small] += 1.0
    found = clustered_partition(h[torch.randperm(200)], 2)
    assert_balanced_permutation(found, 16, 2)
    assert any(set(small.tolist()) <= set(row) for row in found.tolist())


def test_bad_partitions_and_sizes_are_refused():
    with pytest.raises(ValueError, match="do not divide"):
        contiguous_partition(10, 3)
    with pytest.raises(ValueError, match="do not divide"):
        clustered_partition(torch.randn(5, 10), 4)
    with pytest.raises(ValueError, match="exactly once"):
        check_partition(torch.tensor([[0, 1], [1, 2]]), 4)
    check_partition(torch.tensor([[3, 1], [0, 2]]), 4)
