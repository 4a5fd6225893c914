"""`xmoe export-hf`, and `xmoe eval / sweep-threshold / generate` on Hugging Face models (xmoe.hf;
needs `pip install 'xmoe[hf]'`).

    xmoe export-hf --checkpoint runs/a --out hf/a         # an ordinary Hugging Face folder
    xmoe eval --checkpoint hf/a --data held-out.txt --threshold 0.7
    xmoe sweep-threshold --checkpoint olmoe-folder --data held-out.txt --thresholds 0.3 0.5 0.7 [--max-experts 8]
    xmoe generate --checkpoint org/some-moe --prompt "def " --threshold 0.5

xmoe.cli.lm hands a checkpoint here when xmoe.checkpoint_kind finds a Hugging Face MoE folder
("xmoe" model type or a MoE family's config), a Hub id ORG/NAME (transformers loads it), or, for
sweep-threshold, a model converted by `xmoe convert`.
"""

from __future__ import annotations

import dataclasses
import json

from xmoe.errors import UsageError


def export_hf(*, checkpoint: str, out: str) -> None:
    """Write an xmoe LM run as a Hugging Face folder (AutoModelForCausalLM).

    Args:
        checkpoint: run folder of `xmoe train` or `xmoe convert`
        out: new folder (an earlier export there is replaced once the new one is complete)
    """
    from xmoe.hf import export_hf

    written = export_hf(checkpoint, out)
    print(f"exported {checkpoint} -> {written}: load it with AutoModelForCausalLM.from_pretrained({str(written)!r}, "
          f"trust_remote_code=True) (xmoe must be installed), or after `import xmoe.hf`")


def evaluate(checkpoint, *, data: str | None, max_batches: int | None, capacity: bool, device: str,
             threshold: float | None, json_out: bool, max_experts: int | None) -> None:
    """`xmoe eval` on ``checkpoint``, a Hugging Face folder or Hub id (xmoe.checkpoint_kind)."""
    from xmoe.hf.folders import measure, set_dial

    check_folder_args(checkpoint.path, data, capacity)
    model, batches = _open_with_text(checkpoint, data, max_batches, device)
    routing = set_dial(model, model.config.model_type, threshold, max_experts)
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
    from xmoe.sweep import write_sweep

    if checkpoint.kind == "converted":
        check_folder_args(checkpoint.path, data, capacity, "a converted Hugging Face model")
        refuse_max_experts(checkpoint.path, max_experts, "a converted Hugging Face model")
        points = _sweep_converted(checkpoint, data, max_batches, device, thresholds)
    else:
        from xmoe.hf.folders import sweep_folder

        check_folder_args(checkpoint.path, data, capacity)
        model, batches = _open_with_text(checkpoint, data, max_batches, device)
        points = sweep_folder(model, batches, thresholds, max_experts=max_experts)
    write_sweep(points, out or ".", data=data, step=None, baseline="dense" if checkpoint.kind == "converted"
                else "top-k")


def _sweep_converted(checkpoint, data: str, max_batches: int | None, device: str, thresholds: list[float]):
    from xmoe.conversion.hf import sweep_converted
    from xmoe.training.loop import resolve_device

    return sweep_converted(checkpoint.path, data, thresholds, max_batches=max_batches or 8,
                           device=resolve_device(device))


def _open_with_text(checkpoint, data: str, max_batches: int | None, device: str):
    """The model at ``checkpoint`` and up to ``max_batches`` (8) batches of 8 windows of 256
    tokens of the text at ``data``, through its tokenizer."""
    from xmoe.checkpoints import open_checkpoint
    from xmoe.hf.folders import text_batches

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
    set_dial(model, model.config.model_type, threshold, max_experts)
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


def check_folder_args(checkpoint: str, data: str | None, capacity: bool,
                      kind: str = "a Hugging Face model folder") -> None:
    """eval / sweep-threshold on a Hugging Face folder (``kind`` names it): text must be given
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
