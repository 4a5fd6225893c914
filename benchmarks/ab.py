"""A/B: the MoE layer of this checkout against the layer of another git revision, interleaved.

    PYTHONPATH=src python benchmarks/ab.py --base 56b5403 --shapes S1 --repeats 9

Extracts ``src/xmoe/moe`` of ``--base`` (a self-contained package: it imports only itself and
torch) into a temporary folder under another name, builds both layers with the same weights and
the same router calibration as ``xmoe bench layer``, checks they compute the same output, and
times forward and forward+backward alternately in one process, so machine noise hits both
alike. Prints the median time of each and the ratio new / base (below 1: faster now).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from xmoe.bench import layer as bench
from xmoe.bench.probes import CountOps

ROOT = Path(__file__).resolve().parents[1]


def load_base(rev: str, into: Path):
    """``src/xmoe/moe`` at ``rev`` as the package ``xmoe_base_moe``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/xmoe/moe"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "xmoe" / "moe").rename(into / "xmoe_base_moe")
    sys.path.insert(0, str(into))
    return importlib.import_module("xmoe_base_moe")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--shapes", nargs="+", default=["S1"], choices=list(bench.SHAPES))
    parser.add_argument("--backend", default="auto", help="the backend name, in both revisions")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing, count the eager ops of one forward and one backward")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
        if args.count_ops:
            print_op_counts(base, args.base)
            return
        print(f"# A/B of the MoE layer: this checkout vs {args.base}; backend {args.backend}; "
              f"{torch.get_num_threads()} threads; median of {args.repeats}, interleaved")
        print("| shape | pass | base ms | new ms | new / base |")
        print("|---|---|---|---|---|")
        for name in args.shapes:
            for row in compare(bench.SHAPES[name], base, args.backend, args.repeats):
                print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.1f} | {row[3] / row[2]:.2f} |")


def count_ops(moe, backend: str, **fields) -> tuple[int, int]:
    """Eager ops (kernel launches, on a GPU) of one forward and one backward of a small layer:
    threshold router, capacity factor 8, T=256, D=64, F=32, E=16."""
    torch.manual_seed(0)
    layer = moe.MoELayer(moe.MoEConfig(model_dim=64, num_experts=16, expert_dim=32, threshold=0.9,
                                       capacity_factor=8.0, backend=backend, **fields))
    x = torch.randn(256, 64, requires_grad=True)
    layer(x)  # warm-up
    with CountOps() as forward:
        out = layer(x)
    with CountOps() as backward:
        (out.output.sum() + out.aux_loss).backward()
    return forward.count, backward.count


def print_op_counts(base, rev: str) -> None:
    import xmoe.moe as new

    print(f"# eager ops per layer call: {rev} vs this checkout (T=256, D=64, F=32, E=16, threshold 0.9)")
    print("| backend | forward, base | forward, new | backward, base | backward, new |")
    print("|---|---|---|---|---|")
    for backend in ("grouped_mm", "loop", "fused"):
        (bf, bb), (nf, nb) = count_ops(base, backend), count_ops(new, backend)
        print(f"| {backend} | {bf} | {nf} | {bb} | {nb} |")
    nf, nb = count_ops(new, "auto", static_shapes=True, eval_capacity_factor=8.0)
    print(f"| static mode | - | {nf} | - | {nb} |")


def compare(shape: bench.Shape, base, backend: str, repeats: int) -> list[tuple]:
    x = torch.randn(shape.tokens, shape.model_dim, generator=torch.Generator().manual_seed(0))
    new = bench.build_layer(shape, "threshold", backend, 3.0, x, seed=0)
    old = base.MoELayer(base.MoEConfig(**{k: getattr(new.cfg, k) for k in (
        "model_dim", "num_experts", "expert_dim", "router", "threshold", "top_k", "capacity_factor")},
        backend=backend))
    old.load_state_dict(new.state_dict())
    x.requires_grad_(True)
    with torch.no_grad():
        torch.testing.assert_close(old(x).output, new(x).output, rtol=1e-4, atol=1e-5)
    rows = []
    for backward in (False, True):
        times = {"base": [], "new": []}
        candidates = {"base": (lambda: old(x).output, [x, *old.parameters()]),
                      "new": (lambda: new(x).output, [x, *new.parameters()])}
        for fn, leaves in candidates.values():
            bench.timed(fn, backward, lambda: None, leaves)
        for _ in range(repeats):
            for key, (fn, leaves) in candidates.items():
                times[key].append(bench.timed(fn, backward, lambda: None, leaves))
        rows.append((shape.label, "fwd+bwd" if backward else "fwd",
                     1e3 * statistics.median(times["base"]), 1e3 * statistics.median(times["new"])))
    return rows


if __name__ == "__main__":
    main()
