"""`xmoe train-mt`, `xmoe translate`, `xmoe eval-mt`: translation commands; the work lives in
xmoe.training.mt.

    xmoe train-mt --preset cpu-xmoe-32x512 --src train.en --tgt train.de \\
        [--valid-src val.en --valid-tgt val.de] --out runs/mt [--resume] [--train.max_steps=2000 ...]
    xmoe translate --checkpoint runs/mt [--beam 4] [--threshold 0.8] < input.en > output.de
    xmoe eval-mt --checkpoint runs/mt --src test.en --ref test.de [--beam 4] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_MT_PRESET = "cpu-xmoe-32x512"


def add_mt_commands(commands: argparse._SubParsersAction) -> None:
    """Register the translation subcommands on the `xmoe` parser."""
    from xmoe.presets import MT_PRESETS

    p = commands.add_parser("train-mt", help="train a translation preset; --section.key=value flags override the config")
    p.add_argument("--preset", default=DEFAULT_MT_PRESET, help=f"one of {', '.join(MT_PRESETS)}")
    p.add_argument("--src", default=None, help="training source file, one sentence per line")
    p.add_argument("--tgt", default=None, help="training target file, line-aligned with --src")
    p.add_argument("--valid-src", default=None)
    p.add_argument("--valid-tgt", default=None)
    p.add_argument("--out", required=True, help="run folder: checkpoint, spm.model, metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.set_defaults(func=cmd_train_mt, overrides=True)

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


def _decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy); default: the run's decode.beam")
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="change t of the threshold routers at inference")
    p.add_argument("--device", default="auto")


def cmd_train_mt(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from xmoe.training.mt import train_mt

    files = {"data.src": args.src, "data.tgt": args.tgt, "data.valid_src": args.valid_src,
             "data.valid_tgt": args.valid_tgt}
    overrides = {**{k: v for k, v in files.items() if v is not None}, **overrides}
    cfg = _run_config(args.preset, overrides, Path(args.out) if args.resume else None)
    print(f"training {cfg.preset} on {cfg.data.src} -> {cfg.data.tgt}, run folder {args.out}")
    result = train_mt(cfg, args.out, resume=args.resume)
    from xmoe.training.stopping import exit_if_interrupted

    exit_if_interrupted(result, cfg.train.max_steps, args.out, train="xmoe train-mt", evaluate="xmoe eval-mt")
    final = result.final_eval
    line = f"validation loss {final['loss']:.4f}"
    if "bleu" in final:
        line += f", greedy BLEU {final['bleu']:.2f}, chrF++ {final['chrf']:.2f} (first {cfg.eval_bleu_sentences} sentences)"
    print(line)
    if "experts_per_token" in final:
        print(f"experts per token {final['experts_per_token']:.2f}; MoE FLOPs {final['moe_flops_ratio']:.1%} "
              f"of the top-k model of equal parameters")


def _run_config(preset: str, overrides: dict[str, str], resume_dir: Path | None):
    from xmoe.training import apply_overrides
    from xmoe.training.mt import MTRunConfig, mt_run_config
    from xmoe.training.runs import saved_config

    if resume_dir is not None:  # the saved config; train_mt refuses overrides that break exactness
        saved = saved_config(resume_dir, MTRunConfig, "mt")
        if preset not in (DEFAULT_MT_PRESET, saved.preset):
            raise ValueError(f"--resume: {resume_dir} was trained with --preset {saved.preset}, not {preset}")
        return apply_overrides(saved, overrides)
    return mt_run_config(preset, overrides=overrides)


def _load(args: argparse.Namespace):
    """The checkpoint, with --threshold applied, and the decoding settings with --beam etc."""
    from xmoe.moe import set_threshold
    from xmoe.training.mt import load_mt

    loaded = load_mt(args.checkpoint, device=args.device)
    if args.threshold is not None and set_threshold(loaded.model, args.threshold) == 0:
        raise ValueError(f"--threshold: {args.checkpoint} has no threshold-routed MoE layer")
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
