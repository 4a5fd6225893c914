"""Decode benchmark script; the same as `xmoe bench decode` (see benchmarks/README.md).

With ``--base REV``, an A/B of the layer instead: each decoding layer of the benchmark next to the
same layer (same weights) as ``src/xmoe/moe`` at REV builds it, and its active-weights floor, in one
process, interleaved (benchmarks/ab.py's loader): ratios that load moves little.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/decode.py --threads 1 --repeats 7
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/decode.py --base 04a105c --tokens 1 8 --threads 1
"""

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from ab import load_base  # benchmarks/ab.py
from xmoe.bench.decode import SHAPES, active_weights_floor, build_layers, interleaved, main


def base_layer(base, layer):
    """``layer`` as the base revision's MoELayer builds it, on the same weight tensors (eval mode):
    copies would sit elsewhere in memory, and where weights lie moves a GEMV chain's time by up
    to ~10% here (benchmarks/README.md, "Decoding")."""
    fields = {f.name for f in dataclasses.fields(base.MoEConfig)}
    cfg = base.MoEConfig(**{k: v for k, v in dataclasses.asdict(layer.cfg).items() if k in fields})
    old = base.MoELayer(cfg).eval()
    old.load_state_dict(layer.state_dict(), assign=True)
    return old


def ab(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="the decoding layer against a base revision's")
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--shapes", nargs="+", default=["gpt2"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# decode A/B: this checkout vs {args.base}; {torch.get_num_threads()} threads, median of "
          f"{args.repeats}, interleaved; eval mode, no grad")
    print("| shape | T | layer | base / floor | new / floor | new / base |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
        for name in args.shapes:
            layers = build_layers(SHAPES[name], seed=0)
            for tokens in args.tokens:
                x = torch.randn(tokens, SHAPES[name].model_dim, generator=torch.Generator().manual_seed(tokens))
                candidates = {}
                for router, layer in layers.items():
                    old = base_layer(base, layer)
                    candidates[f"{router} new"] = lambda layer=layer: layer(x)
                    candidates[f"{router} base"] = lambda old=old: old(x)
                    candidates[f"{router} floor"] = active_weights_floor(layer, x)[0]
                with torch.no_grad():
                    med = interleaved(candidates, args.repeats)
                for router in layers:
                    new, old, floor = (med[f"{router} {kind}"] for kind in ("new", "base", "floor"))
                    print(f"| {name} | {tokens} | {router} | {old / floor:.2f} | {new / floor:.2f} | {new / old:.2f} |")


if __name__ == "__main__":
    if "--base" in sys.argv:
        ab(sys.argv[1:])
    else:
        main()
