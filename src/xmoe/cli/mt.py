"""`xmoe train-mt`, `xmoe translate`, `xmoe eval-mt`: translation commands; the work lives in
xmoe.tasks.mt.

    xmoe train-mt --preset cpu-xmoe-32x512 --data.src=train.en --data.tgt=train.de \\
        [--data.valid_src=val.en --data.valid_tgt=val.de] --out runs/mt [--resume] [--train.max_steps=2000 ...]
    xmoe translate --checkpoint runs/mt [--beam 4] [--threshold 0.8] < input.en > output.de
    xmoe eval-mt --checkpoint runs/mt --src test.en --ref test.de [--beam 4] [--threshold 0.8]
"""

from __future__ import annotations

import dataclasses
import json as _json  # `json` is also a flag of `xmoe eval-mt`
import sys
from pathlib import Path

from xmoe.errors import UsageError


def train_mt(*, out: str, preset: str | None = None, resume: bool = False, config: dict[str, str]) -> None:
    """Train a translation preset; --section.field=value flags set its run config.

    Args:
        out: run folder: checkpoint, spm.model, metrics
        preset: see `xmoe presets` (default: cpu-xmoe-32x512; with --resume: the run's)
        resume: continue the run in --out exactly where it stopped
    """
    from xmoe.report import describe_mt_eval
    from xmoe.tasks.mt import Translation, train_mt
    from xmoe.training.runs import run_config
    from xmoe.training.stopping import exit_if_interrupted

    cfg = run_config(Translation, preset, config, resume_from=out if resume else None)
    print(f"training {cfg.preset} on {cfg.data.src} -> {cfg.data.tgt}, run folder {out}")
    result = train_mt(cfg, out, resume=resume)
    exit_if_interrupted(result, cfg.train.max_steps, out, train="xmoe train-mt", evaluate="xmoe eval-mt")
    print(describe_mt_eval(result.final_eval, bleu_sentences=cfg.eval_bleu_sentences))


def _load(checkpoint: str, command: str, *, beam: int | None, length_penalty: float | None,
          threshold: float | None, device: str):
    """The checkpoint, with --threshold applied, and the decoding settings with --beam etc."""
    from xmoe.checkpoints import open_checkpoint, set_threshold

    loaded = open_checkpoint(checkpoint, device=device, task="mt", takes=("run",), command=command).run
    if threshold is not None:
        set_threshold(loaded.model, threshold, checkpoint)
    changes = {"beam": beam, "length_penalty": length_penalty}
    decode = dataclasses.replace(loaded.cfg.decode, **{k: v for k, v in changes.items() if v is not None})
    return loaded, decode


def translate(*, checkpoint: str, beam: int | None = None, length_penalty: float | None = None,
              threshold: float | None = None, device: str = "auto") -> None:
    """Translate stdin to stdout, one sentence per line.

    Args:
        checkpoint: run folder (or its checkpoint folder)
        beam: beam size (1 = greedy); default: the run's decode.beam
        threshold: change t of the threshold routers at inference
    """
    from xmoe.data.files import decode_lines
    from xmoe.tasks import mt

    loaded, decode = _load(checkpoint, "translate", beam=beam, length_penalty=length_penalty, threshold=threshold,
                           device=device)
    stdin = getattr(sys.stdin, "buffer", None)  # bytes, so that invalid UTF-8 is named, not a TypeError
    lines = decode_lines(stdin, "stdin") if stdin is not None else list(sys.stdin)
    lines = [line.rstrip("\r\n") for line in lines]  # Unix or Windows line ends
    for hyp in mt.translate(loaded, lines, decode=decode):
        print(hyp)


def _output_file(path: str) -> Path:
    """--hyp-out, its folder made now: a path that cannot take the file fails before the
    decoding, not after it (which lost the scores)."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--hyp-out {path} is a folder; give the name of the file to write the translations to")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def eval_mt(*, checkpoint: str, src: str, ref: str, hyp_out: str | None = None, json: bool = False,
            beam: int | None = None, length_penalty: float | None = None, threshold: float | None = None,
            device: str = "auto") -> None:
    """BLEU, chrF++, experts per token and MoE FLOPs of a checkpoint.

    Args:
        hyp_out: also write the translations to this file
        json: print the full result as JSON
        beam: beam size (1 = greedy); default: the run's decode.beam
        threshold: change t of the threshold routers at inference
    """
    from xmoe.data.translation import read_sentence_pairs
    from xmoe.tasks.mt import evaluate_mt

    hyp_file = _output_file(hyp_out) if hyp_out else None
    loaded, decode = _load(checkpoint, "eval-mt", beam=beam, length_penalty=length_penalty, threshold=threshold,
                           device=device)
    sources, references = read_sentence_pairs(src, ref)
    summary, hyps = evaluate_mt(loaded, sources, references, decode=decode)
    if hyp_file:
        hyp_file.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    if json:
        print(_json.dumps(summary, indent=2))
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
