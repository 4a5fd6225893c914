"""`xmoe train-mt`, `xmoe translate`, `xmoe eval-mt`: translation commands; the work lives in
xmoe.training.mt.

    xmoe train-mt --preset cpu-xmoe-32x512 --data.src=train.en --data.tgt=train.de \\
        [--data.valid_src=val.en --data.valid_tgt=val.de] --out runs/mt [--resume] [--train.max_steps=2000 ...]
    xmoe translate --checkpoint runs/mt [--beam 4] [--threshold 0.8] < input.en > output.de
    xmoe eval-mt --checkpoint runs/mt --src test.en --ref test.de [--beam 4] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from xmoe.cli.flags import add_train_command, run_config


def add_mt_commands(commands: argparse._SubParsersAction) -> None:
    """Register the translation subcommands on the `xmoe` parser."""
    add_train_command(commands, "train-mt", cmd_train_mt, _mt_task, help="train a translation preset",
                      out="checkpoint, spm.model, metrics", renamed={
                          "src": "data.src", "tgt": "data.tgt", "valid-src": "data.valid_src",
                          "valid-tgt": "data.valid_tgt"})

    p = commands.add_parser("translate", help="translate stdin to stdout, one sentence per line")
    p.add_argument("--checkpoint", required=True, help="run folder (or its checkpoint folder)")
    _decode_arguments(p)
    p.set_defaults(func=cmd_translate)

    p = commands.add_parser("eval-mt", help="BLEU, chrF++, experts per token and MoE FLOPs of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--hyp-out", default=None, help="also write the translations to this file")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    _decode_arguments(p)
    p.set_defaults(func=cmd_eval_mt)


def _mt_task():
    from xmoe.training.mt import MT_TASK

    return MT_TASK


def _decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy); default: the run's decode.beam")
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="change t of the threshold routers at inference")
    p.add_argument("--device", default="auto")


def cmd_train_mt(args: argparse.Namespace) -> None:
    from xmoe.training.mt import train_mt
    from xmoe.training.report import describe_mt_eval
    from xmoe.training.stopping import exit_if_interrupted

    cfg = run_config(args)
    print(f"training {cfg.preset} on {cfg.data.src} -> {cfg.data.tgt}, run folder {args.out}")
    result = train_mt(cfg, args.out, resume=args.resume)
    exit_if_interrupted(result, cfg.train.max_steps, args.out, train="xmoe train-mt", evaluate="xmoe eval-mt")
    print(describe_mt_eval(result.final_eval, bleu_sentences=cfg.eval_bleu_sentences))


def _load(args: argparse.Namespace):
    """The checkpoint, with --threshold applied, and the decoding settings with --beam etc."""
    from xmoe.checkpoints import open_checkpoint, set_threshold

    loaded = open_checkpoint(args.checkpoint, device=args.device, task="mt", takes=("run",), command=args.command).run
    if args.threshold is not None:
        set_threshold(loaded.model, args.threshold, args.checkpoint)
    changes = {"beam": args.beam, "length_penalty": args.length_penalty}
    decode = dataclasses.replace(loaded.cfg.decode, **{k: v for k, v in changes.items() if v is not None})
    return loaded, decode


def cmd_translate(args: argparse.Namespace) -> None:
    from xmoe.data.files import decode_lines
    from xmoe.training.mt import translate

    loaded, decode = _load(args)
    stdin = getattr(sys.stdin, "buffer", None)  # bytes, so that invalid UTF-8 is named, not a TypeError
    lines = decode_lines(stdin, "stdin") if stdin is not None else list(sys.stdin)
    lines = [line.rstrip("\r\n") for line in lines]  # Unix or Windows line ends
    for hyp in translate(loaded, lines, decode=decode):
        print(hyp)


def cmd_eval_mt(args: argparse.Namespace) -> None:
    from xmoe.data.parallel import read_parallel
    from xmoe.training.mt import evaluate_mt

    loaded, decode = _load(args)
    src, ref = read_parallel(args.src, args.ref)
    summary, hyps = evaluate_mt(loaded, src, ref, decode=decode)
    if args.hyp_out:
        Path(args.hyp_out).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['sentences']} sentences, beam {summary['beam']}")
    print(summary["bleu_text"])
    print(f"  signature: {summary['bleu_signature']}")
    print(summary["chrf_text"])
    print(f"  signature: {summary['chrf_signature']}")
    print(f"reference cross entropy {summary['loss']:.4f} per target token")
    if "experts_per_token" in summary:
        per_layer = ", ".join(f"{l['experts_per_token']:.2f}" for l in summary["layers"])
        print(f"experts per token: {summary['experts_per_token']:.2f} on average (per MoE layer: {per_layer})")
        print(f"MoE expert FLOPs per token: {summary['moe_flops_per_token'] / 1e6:.3f}M = "
              f"{summary['moe_flops_ratio']:.1%} of the top-k model of equal parameters "
              f"({summary['topk_moe_flops_per_token'] / 1e6:.3f}M)")
