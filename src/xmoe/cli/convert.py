"""`xmoe convert`: a dense GPT checkpoint made sparse (xmoe.conversion), written as a new run folder.

    xmoe convert --checkpoint runs/dense --experts 8 --out runs/dense-x8 [--partition clustered]
                 [--calibration-tokens 16384] [--data PATH]
    xmoe eval --checkpoint runs/dense-x8 --threshold 0.8      # the compute dial
    xmoe sweep-threshold --checkpoint runs/dense-x8
"""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    """Register `xmoe convert` on the subparsers of cli.main."""
    from xmoe.conversion.partition import PARTITIONS

    p = commands.add_parser("convert", help="split a dense GPT's FFNs into experts with a fitted threshold router")
    p.add_argument("--checkpoint", required=True, help="run folder of a dense GPT (a *-dense preset)")
    p.add_argument("--experts", type=int, required=True, help="experts per FFN; must divide d_ff")
    p.add_argument("--out", required=True, help="new run folder for the converted model (must not exist)")
    p.add_argument("--partition", choices=PARTITIONS, default="contiguous",
                   help="how neurons are grouped: contiguous slices, or clustered by co-activation")
    p.add_argument("--calibration-tokens", type=int, default=16384,
                   help="tokens of calibration text for clustering and router fitting")
    p.add_argument("--data", default=None, help="calibration text (default: the run's training split)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    from xmoe.conversion import ConversionConfig, convert_checkpoint

    cfg = ConversionConfig(num_experts=args.experts, partition=args.partition)
    out = convert_checkpoint(args.checkpoint, args.out, cfg, calibration_tokens=args.calibration_tokens,
                             data=args.data, device=args.device)
    print(f"converted {args.checkpoint} -> {out}: every FFN split into {args.experts} experts "
          f"({args.partition}), routers fitted; t = 1.0 reproduces the dense model")
    print(f"next: xmoe sweep-threshold --checkpoint {out}   (or xmoe eval --checkpoint {out} --threshold 0.8)")
