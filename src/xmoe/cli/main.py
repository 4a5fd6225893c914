"""`xmoe <command>`: one subcommand per job. Each is a small function over the library."""

from __future__ import annotations

import argparse
import sys


def _bench_layer(args: argparse.Namespace) -> None:
    from xmoe.bench import layer

    layer.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmoe", description="XMoE: sparse MoE with a threshold router")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench", required=True, metavar="KIND")
    from xmoe.bench import layer

    bench_layer = bench_kinds.add_parser("layer", help="MoE layer speed against the speed limit and baselines")
    layer.add_arguments(bench_layer)
    bench_layer.set_defaults(func=_bench_layer)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
