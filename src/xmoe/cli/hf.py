"""`xmoe export-hf`, and `xmoe eval / sweep-threshold / generate` on Hugging Face MoE folders
(xmoe.hf; needs `pip install 'xmoe[hf]'`).

    xmoe export-hf --checkpoint runs/a --out hf/a         # an ordinary Hugging Face folder
    xmoe eval --checkpoint hf/a --data held-out.txt --threshold 0.7
    xmoe sweep-threshold --checkpoint olmoe-folder --data held-out.txt --thresholds 0.3 0.5 0.7 [--max-experts 8]
    xmoe generate --checkpoint olmoe-folder --prompt "def " --threshold 0.5
    xmoe lm-eval --checkpoint olmoe-folder --tasks hellaswag arc_easy --thresholds 0.3 0.5 0.7 [--limit 500]

A folder is handled here when its config.json names the "xmoe" model type or a supported MoE
family (``xmoe.hf.SUPPORTED_FAMILIES``: OLMoE, FlexOlmo, Qwen2/3/3.5-MoE, Qwen3-Next, Mixtral,
Gemma-4, gpt-oss, DeepSeek-V3, GLM-4.5); other folders keep their own paths in cli.main.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xmoe.errors import UsageError


def add_commands(commands) -> None:
    """Register `xmoe export-hf` and the Hugging Face flags of eval / sweep-threshold / generate."""
    p = commands.add_parser("export-hf", help="write an xmoe LM run as a Hugging Face folder (AutoModelForCausalLM)")
    p.add_argument("--checkpoint", required=True, help="run folder of `xmoe train` or `xmoe convert`")
    p.add_argument("--out", required=True, help="new folder (an earlier export there is replaced once the new one is complete)")
    p.set_defaults(func=cmd_export)
    add_lm_eval_command(commands)
    for name in ("eval", "sweep-threshold", "generate"):
        commands.choices[name].add_argument(
            "--max-experts", type=int, default=None,
            help="Hugging Face MoE folders: at most this many experts per token under --threshold(s)")


def handles(checkpoint: str) -> bool:
    """True for a Hugging Face folder whose model type is "xmoe" or a MoE family (supported or
    not: an unsupported one gets its error from xmoe.hf.folders.folder_kind)."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if (Path(checkpoint) / "state.json").exists() or (Path(checkpoint) / "checkpoint").exists():
        return False  # an `xmoe train` run or checkpoint folder
    moe_fields = ("num_experts", "num_local_experts", "n_routed_experts", "moe")
    text_config = config.get("text_config") or {}  # multimodal checkpoints (Gemma-4, Qwen3.5-MoE)
    return config.get("model_type") == "xmoe" or any(config.get(f) or text_config.get(f) for f in moe_fields)


def cmd_export(args: argparse.Namespace) -> None:
    from xmoe.hf import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True) (xmoe must be installed), or after `import xmoe.hf`")


def cmd_eval(args: argparse.Namespace) -> None:
    from xmoe.hf.folders import evaluate, load_folder, set_dial, text_batches

    check_folder_args(args)
    model, kind = load_folder(args.checkpoint, device=_device(args))
    batches = text_batches(args.checkpoint, args.data, model, max_batches=args.max_batches or 8, batch_size=8,
                           seq_len=256)
    point = evaluate(model, kind, batches, set_dial(model, kind, args.threshold, args.max_experts), args.threshold)
    if args.json:
        print(json.dumps(point.to_dict(), indent=2))
        return
    print(f"{point.routing}: loss {point.loss:.4f}, perplexity {point.perplexity:.2f} ({point.tokens} tokens), "
          f"{point.experts_per_token:.2f} experts per token, {point.tokens_per_second:.0f} tokens/s")


def cmd_sweep(args: argparse.Namespace) -> None:
    from xmoe.hf.folders import points_table, sweep_folder

    check_folder_args(args)
    points = sweep_folder(args.checkpoint, args.data, args.thresholds, max_experts=args.max_experts,
                          max_batches=args.max_batches or 8, device=_device(args))
    print(points_table(points))
    out = Path(args.out or Path(args.checkpoint) / "report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "threshold_sweep.json").write_text(json.dumps([p.to_dict() for p in points], indent=2))
    print(f"json: {out / 'threshold_sweep.json'}")


def add_lm_eval_command(commands) -> None:
    p = commands.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks on a Hugging Face MoE or xmoe folder, as loaded and at each threshold")
    p.add_argument("--checkpoint", required=True, help="a Hugging Face folder: `xmoe export-hf` or a pretrained MoE")
    p.add_argument("--tasks", nargs="+", required=True, help="harness task names (its registry, or --include-path)")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.9],
                   help="the dial's settings, after the model as loaded (default: 0.3 0.5 0.7 0.9)")
    p.add_argument("--max-experts", type=int, default=None, help="pretrained MoE folders: at most this many experts")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1); default all")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--include-path", default=None, help="a folder of task YAML files of your own")
    p.add_argument("--batch-size", type=int, default=1,
                   help="sequences per forward (default 1: with more, the harness's pads are routed and counted)")
    p.add_argument("--out", default=".", help="where lm_eval.json and lm_eval.md go (default: this folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps")
    p.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from xmoe.conversion.hf import load_tokenizer
    from xmoe.hf.folders import load_folder
    from xmoe.hf.harness import points_table, run_tasks, write_points

    if args.limit is not None and not args.limit > 0:
        raise UsageError(f"--limit must be > 0 (documents per task, or a fraction of them below 1), got {args.limit:g}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model, kind = load_folder(args.checkpoint, device=_device(args))
    points, _ = run_tasks(model, load_tokenizer(args.checkpoint), kind, args.tasks, args.thresholds,
                          max_experts=args.max_experts, limit=limit, num_fewshot=args.num_fewshot,
                          include_path=args.include_path, batch_size=args.batch_size)
    print(points_table(points))
    print(f"json: {write_points(points, args.out)}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from xmoe.bench.decode import generation_report
    from xmoe.conversion.hf import load_tokenizer
    from xmoe.hf.folders import load_folder, set_dial

    model, kind = load_folder(args.checkpoint, device=_device(args))
    set_dial(model, kind, args.threshold, args.max_experts)
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


def _device(args: argparse.Namespace):
    from xmoe.training.loop import resolve_device

    return resolve_device(getattr(args, "device", "auto"))
