"""`xmoe export-hf`, and `xmoe eval / sweep-threshold / generate` on Hugging Face MoE folders
(xmoe.hf; needs `pip install 'xmoe[hf]'`).

    xmoe export-hf --checkpoint runs/a --out hf/a         # an ordinary Hugging Face folder
    xmoe eval --checkpoint hf/a --data held-out.txt --threshold 0.7
    xmoe sweep-threshold --checkpoint olmoe-folder --data held-out.txt --thresholds 0.3 0.5 0.7 [--max-experts 8]
    xmoe generate --checkpoint olmoe-folder --prompt "def " --threshold 0.5

A folder is handled here when xmoe.checkpoint_kind finds a Hugging Face MoE folder ("xmoe" model
type or a MoE family's config) or a Hub id ORG/NAME, which transformers loads.
"""

from __future__ import annotations

import argparse
import json

from xmoe.errors import UsageError


def add_commands(commands) -> None:
    """Register `xmoe export-hf` and the Hugging Face flags of eval / sweep-threshold / generate."""
    p = commands.add_parser("export-hf", help="write an xmoe LM run as a Hugging Face folder (AutoModelForCausalLM)")
    p.add_argument("--checkpoint", required=True, help="run folder of `xmoe train` or `xmoe convert`")
    p.add_argument("--out", required=True, help="new folder (an earlier export there is replaced once the new one is complete)")
    p.set_defaults(func=cmd_export)
    for name in ("eval", "sweep-threshold", "generate"):
        commands.choices[name].add_argument(
            "--max-experts", type=int, default=None,
            help="Hugging Face MoE folders: at most this many experts per token under --threshold(s)")


def cmd_export(args: argparse.Namespace) -> None:
    from xmoe.hf import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True) (xmoe must be installed), or after `import xmoe.hf`")


def cmd_eval(args: argparse.Namespace, checkpoint) -> None:
    """`xmoe eval` on ``checkpoint``, a Hugging Face folder or Hub id (xmoe.checkpoint_kind)."""
    import dataclasses

    from xmoe.hf.folders import measure, set_dial

    model, batches = _open_with_text(args, checkpoint)
    routing = set_dial(model, model.config.model_type, args.threshold, args.max_experts)
    point = dataclasses.replace(measure(model, batches), threshold=args.threshold, routing=routing)
    if args.json:
        print(json.dumps(point.to_dict(), indent=2))
        return
    print(f"{point.routing}: loss {point.loss:.4f}, perplexity {point.perplexity:.2f} ({point.tokens} tokens), "
          f"{point.experts_per_token:.2f} experts per token, {point.tokens_per_second:.0f} tokens/s")


def cmd_sweep(args: argparse.Namespace, checkpoint) -> None:
    """`xmoe sweep-threshold` on ``checkpoint``, a Hugging Face folder or Hub id: the report goes
    to --out or the current folder, never into the model's folder."""
    from xmoe.hf.folders import sweep_folder
    from xmoe.sweep import write_sweep

    model, batches = _open_with_text(args, checkpoint)
    points = sweep_folder(model, batches, args.thresholds, max_experts=args.max_experts)
    write_sweep(points, args.out or ".", data=args.data, step=None, baseline="top-k")


def _open_with_text(args: argparse.Namespace, checkpoint):
    """The model at ``checkpoint`` and up to --max-batches (8) batches of 8 windows of 256 tokens
    of the --data text, through its tokenizer."""
    from xmoe.checkpoints import open_checkpoint
    from xmoe.hf.folders import text_batches

    check_folder_args(args)
    model = open_checkpoint(checkpoint, device=args.device).model
    batches = text_batches(args.checkpoint, args.data, model, max_batches=args.max_batches or 8, batch_size=8,
                           seq_len=256)
    return model, batches


def cmd_generate(args: argparse.Namespace, checkpoint) -> None:
    """`xmoe generate` on ``checkpoint``, a Hugging Face folder or Hub id."""
    import torch

    from xmoe.bench.decode import generation_report
    from xmoe.checkpoints import open_checkpoint
    from xmoe.conversion.hf import load_tokenizer
    from xmoe.hf.folders import set_dial

    model = open_checkpoint(checkpoint, device=args.device).model
    set_dial(model, model.config.model_type, args.threshold, args.max_experts)
    tokenizer = load_tokenizer(args.checkpoint)
    ids = tokenizer(args.prompt)["input_ids"]
    if not ids:
        raise UsageError("--prompt is empty; give some text to continue")
    torch.manual_seed(args.seed)
    # None means "no top-k / top-p" here, as for xmoe runs (transformers would fall back to its defaults).
    sampling = {"do_sample": False} if args.temperature == 0 else {
        "do_sample": True, "temperature": args.temperature, "top_k": args.top_k or 0, "top_p": args.top_p or 1.0}
    device = next(model.parameters()).device
    with generation_report(model, args.max_new_tokens):
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id, **sampling)
    print(tokenizer.decode(out[0].tolist()))


def check_folder_args(args: argparse.Namespace, kind: str = "a Hugging Face model folder") -> None:
    """eval / sweep-threshold on a Hugging Face folder (``kind`` names it): text must be given
    and there is no training capacity to turn on."""
    if args.data is None:
        raise UsageError(f"{args.checkpoint} is {kind}, which brings no evaluation text: "
                         f"give held-out text with --data FILE")
    if args.capacity:
        raise UsageError(f"--capacity: {kind} is evaluated dropless (it has no training capacity)")


def refuse_max_experts(args: argparse.Namespace, kind: str) -> None:
    """--max-experts caps a pretrained MoE folder's routing; on ``kind`` (an xmoe run, a
    converted model) nothing would read it, so it is refused rather than ignored."""
    if getattr(args, "max_experts", None) is not None:
        raise UsageError(f"--max-experts applies to Hugging Face MoE folders; {args.checkpoint} is {kind}, whose cap "
                         f"is its config's model.moe.max_experts: drop --max-experts")
