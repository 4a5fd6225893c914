"""Two choices in the fused backend (src/xmoe/moe/backends/fused.py), measured:

1. its run size, ``CHUNK_BYTES``: the layer's forward+backward time at one shape with runs of at
   least ROWS rows, every size interleaved in one process (medians);
2. its bf16 error: under bf16 autocast it rounds the combine weight to bf16 before it multiplies
   the activation, where ``loop`` weights the fp32 output. Printed: each backend's relative error
   against the same layer in fp32, and fused's over loop's.

    python benchmarks/fused_backend.py                        # S1, runs of 256 ... 4,096 rows
"""

from __future__ import annotations

import argparse
import statistics

import torch

from xmoe.bench.layer import SHAPES, build_layer, timed
from xmoe.moe.backends import fused


def run_sizes(shape_name: str, rows: list[int], repeats: int) -> dict[int, float]:
    """Median forward+backward seconds of the fused layer with runs of at least each ``rows``."""
    shape = SHAPES[shape_name]
    x = torch.randn(shape.tokens, shape.model_dim, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer = build_layer(shape, "threshold", "fused", 3.0, x.detach(), seed=0)
    leaves = [x, *layer.parameters()]
    default = fused.CHUNK_BYTES
    times: dict[int, list[float]] = {n: [] for n in rows}
    try:
        for round_ in range(repeats + 1):  # round 0 warms up
            for n in rows:
                fused.CHUNK_BYTES = n * shape.model_dim * x.element_size()
                seconds = timed(lambda: layer(x).output, True, lambda: None, leaves)
                if round_:
                    times[n].append(seconds)
    finally:
        fused.CHUNK_BYTES = default
    medians = {n: statistics.median(t) for n, t in times.items()}
    print(f"{shape.label}, forward+backward, median of {repeats}")
    print("| least rows per run | MB | ms | vs fastest |\n|---|---|---|---|")
    best = min(medians.values())
    for n, t in medians.items():
        mark = " (CHUNK_BYTES)" if n == default // (shape.model_dim * x.element_size()) else ""
        print(f"| {n:,}{mark} | {n * shape.model_dim * 4 / 2**20:.1f} | {t * 1e3:.0f} | {t / best:.2f} |")
    return medians


def bf16_error(shape_name: str) -> dict[str, float]:
    """Relative error of the loop and fused layers under bf16 autocast, against the fp32 layer."""
    shape = SHAPES[shape_name]
    x = torch.randn(shape.tokens, shape.model_dim, generator=torch.Generator().manual_seed(0))
    layers = {b: build_layer(shape, "threshold", b, 3.0, x, seed=0) for b in ("loop", "fused")}
    layers["fused"].load_state_dict(layers["loop"].state_dict())
    with torch.no_grad():
        # The fp32 layer is the reference: autocast leaves the router in fp32, so both route the
        # same way, and fp32's own error (~1e-7) is nothing beside bf16's.
        exact = layers["loop"](x).output.double()
        errors = {}
        for name, layer in layers.items():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x).output
            errors[name] = ((out.double() - exact).norm() / exact.norm()).item()
    print(f"\n{shape.label}, bf16 autocast, relative error against the fp32 layer: "
          f"loop {errors['loop']:.2e}, fused {errors['fused']:.2e}, fused / loop {errors['fused'] / errors['loop']:.2f}")
    return errors


def main(argv: list[str] | None = None) -> tuple[dict[int, float], dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="S1", choices=list(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 682, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    return run_sizes(args.shape, args.rows, args.repeats), bf16_error(args.shape)


if __name__ == "__main__":
    main()
