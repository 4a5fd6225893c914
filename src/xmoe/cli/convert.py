"""`xmoe convert`: a dense model made sparse (xmoe.conversion), written as a new folder.

An `xmoe train` run (a *-dense preset) becomes a new run folder:

    xmoe convert --checkpoint runs/dense --experts 8 --out runs/dense-x8 [--partition clustered]
                 [--calibration-tokens 16384] [--data PATH]
    xmoe eval --checkpoint runs/dense-x8 --threshold 0.8      # the compute dial
    xmoe sweep-threshold --checkpoint runs/dense-x8

A Hugging Face causal LM (GPT-2 or LLaMA-style, saved with save_pretrained together with its
tokenizer; needs `pip install 'xmoe[hf]'`) becomes a converted HF folder, calibrated on --data:

    xmoe convert --checkpoint my-gpt2 --experts 8 --out my-gpt2-x8 --data calibration.txt
    xmoe sweep-threshold --checkpoint my-gpt2-x8 --data held-out.txt
    xmoe.conversion.hf.load_converted("my-gpt2-x8")          # in Python
"""

from __future__ import annotations

import argparse

from xmoe.errors import UsageError


def add_command(commands) -> None:
    """Register `xmoe convert` on the subparsers of cli.main."""
    p = commands.add_parser(
        "convert", help="split a dense model's FFNs (an xmoe GPT run or a Hugging Face folder) into experts")
    p.add_argument("--checkpoint", required=True,
                   help="run folder of a dense GPT (a *-dense preset), or a Hugging Face model folder")
    p.add_argument("--experts", type=int, required=True, help="experts per FFN; must divide d_ff")
    p.add_argument("--out", required=True, help="new folder for the converted model (must not exist)")
    p.later(_add_partition)
    p.add_argument("--calibration-tokens", type=int, default=16384,
                   help="tokens of calibration text for clustering and router fitting")
    p.add_argument("--data", default=None,
                   help="calibration text (default: the run's training split; required for a Hugging Face model)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_convert)


def _add_partition(p: argparse.ArgumentParser) -> None:
    from xmoe.conversion.partition import PARTITIONS

    p.add_argument("--partition", choices=PARTITIONS, default="contiguous",
                   help="how neurons are grouped: contiguous slices, or clustered by co-activation")


def cmd_convert(args: argparse.Namespace) -> None:
    from xmoe.checkpoints import checkpoint_kind, expect
    from xmoe.conversion import ConversionConfig, convert_checkpoint

    checkpoint = checkpoint_kind(args.checkpoint)
    if checkpoint.kind == "converted":
        raise UsageError(f"{args.checkpoint} is already converted (it holds xmoe_conversion.json); convert the "
                         f"dense model it came from instead")
    expect(checkpoint, ("run", "hf-dense"), "convert")
    cfg = ConversionConfig(num_experts=args.experts, partition=args.partition)
    if checkpoint.kind == "hf-dense":
        return _convert_hf(args, cfg)
    out = convert_checkpoint(args.checkpoint, args.out, cfg, calibration_tokens=args.calibration_tokens,
                             data=args.data, device=args.device)
    print(f"converted {args.checkpoint} -> {out}: every FFN split into {args.experts} experts "
          f"({args.partition}), routers fitted; t = 1.0 reproduces the dense model")
    print(f"next: xmoe sweep-threshold --checkpoint {out}   (or xmoe eval --checkpoint {out} --threshold 0.8)")


def _convert_hf(args: argparse.Namespace, cfg) -> None:
    from xmoe.conversion.hf import convert_hf_checkpoint
    from xmoe.training.loop import resolve_device

    out, reports = convert_hf_checkpoint(args.checkpoint, args.out, cfg, data=args.data,
                                         calibration_tokens=args.calibration_tokens,
                                         device=resolve_device(args.device))
    print(f"converted the Hugging Face model {args.checkpoint} -> {out}: {len(reports)} FFNs split into "
          f"{args.experts} experts ({args.partition}), routers fitted; t = 1.0 reproduces the dense model")
    print(f"next: xmoe sweep-threshold --checkpoint {out} --data HELD_OUT_TEXT   "
          f"(in Python: xmoe.conversion.hf.load_converted({str(out)!r}))")
