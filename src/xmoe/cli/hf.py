"""`xmoe export-hf`, and `xmoe eval / sweep-threshold / generate` on Hugging Face models (xmoe.hf;
needs `pip install 'xmoe[hf]'`).

    xmoe export-hf --checkpoint runs/a --out hf/a         # an ordinary Hugging Face folder
    xmoe eval --checkpoint hf/a --data held-out.txt --threshold 0.7
    xmoe sweep-threshold --checkpoint olmoe-folder --data held-out.txt --thresholds 0.3 0.5 0.7 [--max-experts 8]
    xmoe generate --checkpoint org/some-moe --prompt "def " --threshold 0.5
    xmoe lm-eval --checkpoint olmoe-folder --tasks hellaswag arc_easy --thresholds 0.3 0.5 0.7 [--limit 500]

xmoe.cli.lm hands a checkpoint here when xmoe.checkpoint_kind finds a Hugging Face MoE folder
("xmoe" model type or the config of a family ``xmoe.hf.SUPPORTED_FAMILIES`` lists: OLMoE,
FlexOlmo, Qwen2/3/3.5-MoE, Qwen3-Next, Mixtral, Gemma-4, gpt-oss, DeepSeek-V3, GLM-4.5), a Hub id
ORG/NAME (transformers loads it), or, for sweep-threshold, a model converted by `xmoe convert`.
"""

from __future__ import annotations

import dataclasses
import json

from xmoe.errors import UsageError


def export_hf(*, checkpoint: str, out: str, dropless: bool = False) -> None:
    """Write an xmoe LM run as a Hugging Face folder (AutoModelForCausalLM).

    Args:
        checkpoint: run folder of `xmoe train` or `xmoe convert`
        out: new folder (an earlier export there is replaced once the new one is complete)
        dropless: write a model that evaluates with capacity (eval_capacity_factor) to route dropless, as the
            folder's modeling code does (without it, such a model is refused)
    """
    from xmoe.hf import export_hf

    written = export_hf(checkpoint, out, dropless=dropless)
    print(f"exported {checkpoint} -> {written}: load it with AutoModelForCausalLM.from_pretrained({str(written)!r}, "
          f"trust_remote_code=True) (the folder's own code: no xmoe needed), or after `import xmoe.hf` "
          f"(xmoe's layers)")


def lm_eval(*, checkpoint: str, tasks: list[str], thresholds: list[float] | None = None,
            max_experts: int | None = None, limit: float | None = None, num_fewshot: int | None = None,
            include_path: str | None = None, batch_size: int = 1, out: str = ".", device: str = "auto") -> None:
    """lm-evaluation-harness tasks on a Hugging Face MoE or xmoe folder, as loaded and at each threshold.

    Args:
        checkpoint: a Hugging Face folder (`xmoe export-hf` or a pretrained MoE), or a Hub id ORG/NAME
        tasks: harness task names (its registry, or --include-path)
        thresholds: the dial's settings, after the model as loaded (default: 0.3 0.5 0.7 0.9)
        max_experts: pretrained MoE folders: at most this many experts
        limit: documents per task (a fraction if < 1); default all
        num_fewshot: few-shot examples (default: each task's own)
        include_path: a folder of task YAML files of your own
        batch_size: sequences per forward (default 1: with more, the harness's pads are routed and counted)
        out: where lm_eval.json and lm_eval.md go (default: this folder)
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps
    """
    from xmoe.checkpoints import open_checkpoint
    from xmoe.conversion.hf import load_tokenizer
    from xmoe.hf.harness import points_table, run_tasks, write_points

    if limit is not None and not limit > 0:
        raise UsageError(f"--limit must be > 0 (documents per task, or a fraction of them below 1), got {limit:g}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be a positive number of sequences, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more examples, got {num_fewshot}")
    check_thresholds(thresholds)
    model = open_checkpoint(checkpoint, device=device, takes=("hf", "hub"), command="lm-eval").model
    points, _ = run_tasks(model, load_tokenizer(checkpoint), tasks,
                          [0.3, 0.5, 0.7, 0.9] if thresholds is None else thresholds, max_experts=max_experts,
                          limit=int(limit) if limit is not None and limit >= 1 else limit, num_fewshot=num_fewshot,
                          include_path=include_path, batch_size=batch_size)
    print(points_table(points))
    print(f"json: {write_points(points, out)}")


def evaluate(checkpoint, *, data: str | None, max_batches: int | None, capacity: bool, device: str,
             threshold: float | None, json_out: bool, max_experts: int | None) -> None:
    """`xmoe eval` on ``checkpoint``, a Hugging Face folder or Hub id (xmoe.checkpoint_kind)."""
    from xmoe.hf.folders import measure, set_dial

    check_folder_args(checkpoint.path, data, capacity, checkpoint.what)
    model, batches = _open_with_text(checkpoint, data, max_batches, device)
    routing = set_dial(model, threshold, max_experts)
    point = dataclasses.replace(measure(model, batches), threshold=threshold, routing=routing)
    if json_out:
        print(json.dumps(point.to_dict(), indent=2))
        return
    print(f"{point.routing}: loss {point.loss:.4f}, perplexity {point.perplexity:.2f} ({point.tokens} tokens), "
          f"{point.experts_per_token:.2f} experts per token, {point.tokens_per_second:.0f} tokens/s")


def sweep_threshold(checkpoint, *, data: str | None, max_batches: int | None, capacity: bool, device: str,
                    thresholds: list[float], out: str | None, max_experts: int | None) -> None:
    """`xmoe sweep-threshold` on ``checkpoint``, a Hugging Face folder, a Hub id or a converted
    model: the report goes to --out or the current folder, never into the model's folder."""
    from xmoe.hf.folders import measure, sweep_folder
    from xmoe.sweep import sweep, threshold_dial, write_sweep

    converted = checkpoint.kind == "converted"
    kind = checkpoint.what
    check_folder_args(checkpoint.path, data, capacity, kind)
    if converted:
        refuse_max_experts(checkpoint.path, max_experts, kind)
    model, batches = _open_with_text(checkpoint, data, max_batches, device)
    if converted:  # saved at t = 1, where it is the dense model: the baseline, not a point
        points = sweep(thresholds, lambda: measure(model, batches), threshold_dial(model))
    else:
        points = sweep_folder(model, batches, thresholds, max_experts=max_experts)
    write_sweep(points, out or ".", data=data, step=None, baseline="dense" if converted else "top-k")


def _open_with_text(checkpoint, data: str, max_batches: int | None, device: str):
    """The model at ``checkpoint`` and up to ``max_batches`` (8) batches of 8 windows of 256
    tokens of the text at ``data``, through its tokenizer."""
    from xmoe.checkpoints import open_checkpoint
    from xmoe.conversion.hf import text_batches

    model = open_checkpoint(checkpoint, device=device).model
    batches = text_batches(checkpoint.path, data, model, max_batches=max_batches or 8, batch_size=8, seq_len=256)
    return model, batches


def generate(checkpoint, *, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, threshold: float | None, seed: int, device: str, max_experts: int | None) -> None:
    """`xmoe generate` on ``checkpoint``, a Hugging Face folder or Hub id."""
    import torch

    from xmoe.bench.decode import generation_report
    from xmoe.checkpoints import open_checkpoint
    from xmoe.conversion.hf import load_tokenizer
    from xmoe.hf.folders import set_dial

    model = open_checkpoint(checkpoint, device=device).model
    set_dial(model, threshold, max_experts)
    tokenizer = load_tokenizer(checkpoint.path)
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UsageError("--prompt is empty; give some text to continue")
    torch.manual_seed(seed)
    # None means "no top-k / top-p" here, as for xmoe runs (transformers would fall back to its defaults).
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
    on = next(model.parameters()).device
    with generation_report(model, max_new_tokens):
        out = model.generate(torch.tensor([ids], device=on), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id, **sampling)
    print(tokenizer.decode(out[0].tolist()))


def check_thresholds(thresholds: list[float] | None) -> None:
    """--thresholds, each checked before loading (a bad one late in the list stopped the run
    after the points before it)."""
    from xmoe.moe.config import check_threshold

    for threshold in thresholds or ():
        try:
            check_threshold(threshold)
        except ValueError as err:
            raise UsageError(f"--thresholds {threshold:g}: {err}") from None


def check_folder_args(checkpoint: str, data: str | None, capacity: bool, kind: str) -> None:
    """eval / sweep-threshold on a Hugging Face folder or Hub id (``kind`` names it): text must be given
    and there is no training capacity to turn on."""
    if data is None:
        raise UsageError(f"{checkpoint} is {kind}, which brings no evaluation text: "
                         f"give held-out text with --data FILE")
    if capacity:
        raise UsageError(f"--capacity: {kind} is evaluated dropless (it has no training capacity)")


def refuse_max_experts(checkpoint: str, max_experts: int | None, kind: str) -> None:
    """--max-experts caps a pretrained MoE folder's routing; on ``kind`` (an xmoe run, a
    converted model) nothing would read it, so it is refused rather than ignored."""
    if max_experts is not None:
        raise UsageError(f"--max-experts applies to Hugging Face MoE folders; {checkpoint} is {kind}, whose cap "
                         f"is its config's model.moe.max_experts: drop --max-experts")
