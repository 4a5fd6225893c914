"""How much a GEMM loses when it is cut into one small GEMM per expert (CPU, fp32).

The layer benchmark's "expert GEMMs" column shows that the kept pairs' rows, run through their
own experts, take longer than the same rows through one dense GEMM. This script isolates why:
the same [N, D] x [D, F] product done once, and as E products of N/E rows each (one per
expert's weights), on all threads and on one; and, where this PyTorch build has MKL's packed
GEMM (torch.ops.mkl, used by Inductor for frozen CPU models), with each expert's weights packed
once in advance, which removes the per-call packing of the weight matrix.

    python benchmarks/small_gemms.py [--rows-per-expert 192] [--experts 64] [--dim 768] [--hidden 384]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows-per-expert", type=int, default=192, help="S1 at t=0.9: 12,288 pairs / 64")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    n, E, D, F = args.rows_per_expert, args.experts, args.dim, args.hidden
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n * E, D, generator=gen)
    w = torch.randn(E, D, F, generator=gen) * D**-0.5
    out = torch.empty(n * E, F)
    parts = [(slice(e * n, (e + 1) * n), e) for e in range(E)]

    def one() -> None:
        torch.mm(x, w[0], out=out)

    def per_expert() -> None:
        for rows, e in parts:
            torch.mm(x[rows], w[e], out=out[rows])

    rows = []
    threads = torch.get_num_threads()
    for label, count in ((f"{threads} threads", threads), ("1 thread", 1)):
        torch.set_num_threads(count)
        dense, split = median_ms(one, args.repeats), median_ms(per_expert, args.repeats)
        rows.append((label, "per-call weights", dense, split))
    torch.set_num_threads(threads)

    packed_note = ""
    if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        w_out_in = w.transpose(1, 2).contiguous()  # the [out, in] layout the op takes
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w_out_in[e], n) for e in range(E)]
        torch.testing.assert_close(torch.ops.mkl._mkl_linear(x[:n], packed[0], w_out_in[0], None, n), x[:n] @ w[0])

        def per_expert_packed() -> None:
            for rows, e in parts:
                torch.ops.mkl._mkl_linear(x[rows], packed[e], w_out_in[e], None, n)

        rows.append((f"{threads} threads", "weights packed once", median_ms(one, args.repeats),
                     median_ms(per_expert_packed, args.repeats)))
    else:
        packed_note = "(this PyTorch build has no torch.ops.mkl packed GEMM)"

    print(f"# [{n * E} x {D}] x [{D} x {F}] fp32, once vs {E} experts x {n} rows; torch {torch.__version__}, "
          f"median of {args.repeats} {packed_note}")
    print("| threads | per-expert weights | one GEMM ms | per-expert GEMMs ms | one / per-expert |")
    print("|---|---|---|---|---|")
    for label, kind, dense, split in rows:
        print(f"| {label} | {kind} | {dense:.1f} | {split:.1f} | {dense / split:.2f} |")


if __name__ == "__main__":
    main()
