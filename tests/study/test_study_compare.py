"""The compute-matched top-k of a measured experts per token (study/compare.py): the integers
next to it, or the one it sits on, checked against a brute-force scan of every k."""

from __future__ import annotations

import pytest

from xmoe.study.compare import TOLERANCE, compute_matched_k


def matched_by_scan(experts_per_token: float, num_experts: int) -> list[int]:
    """Every k in 1..E within the tolerance of the measured value; else the two k around it
    (k = 1 below one expert per token, k = E above E)."""
    on = [k for k in range(1, num_experts + 1) if abs(experts_per_token - k) <= TOLERANCE]
    if on:
        return on
    below = [k for k in range(1, num_experts + 1) if k < experts_per_token]
    above = [k for k in range(1, num_experts + 1) if k > experts_per_token]
    return sorted({max(below, default=1), min(above, default=num_experts)})


@pytest.mark.parametrize("experts_per_token", [0.3, 1.0, 1.04, 1.06, 1.5, 1.94, 2.04, 2.36, 7.99, 63.7, 64.0])
def test_matched_k_are_the_integers_around_the_measured_compute(experts_per_token) -> None:
    assert compute_matched_k(experts_per_token, 64) == matched_by_scan(experts_per_token, 64)


def test_examples() -> None:
    assert compute_matched_k(2.36, 64) == [2, 3]  # the demo's XMoE: compared with top-2 and top-3
    assert compute_matched_k(2.03, 64) == [2]
    assert compute_matched_k(0.5, 64) == [1]
    assert compute_matched_k(7.5, 8) == [7, 8]
