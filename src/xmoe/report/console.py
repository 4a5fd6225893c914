"""What a command prints about an evaluation: one or a few sentences a user can act on."""

from __future__ import annotations

import statistics


def is_dense_split(moe) -> bool:
    """A dense FFN split into experts (top_k = E): its own baseline is the dense FFN."""
    return moe is not None and moe.top_k >= moe.num_experts


def flops_baseline(moe) -> str:
    """What the MoE FLOPs ratio compares with: a split dense FFN (top_k = E) is its own baseline."""
    if is_dense_split(moe):
        return f"the dense FFN's (all {moe.num_experts} experts' compute)"
    return f"top-{moe.top_k} over the same {moe.num_experts} experts"


def describe_eval(summary: dict, moe, on: str | None = None, *, sharpened: bool = False,
                  last_train: dict | None = None) -> str:
    """An LM evaluation (``LMEval.to_dict()``) in words, with what to do when nothing is saved
    yet; ``moe``: the model's MoEConfig; ``on``: the text evaluated, if not the validation split;
    ``sharpened``: the run already trained with the router entropy loss; ``last_train``: the
    training's last logged row, when this evaluation follows its progress bar (which counts the
    pairs capacity kept: where it dropped some, the evaluation, dropless, says so)."""
    what = "validation loss" if on is None else f"loss on {on}"
    lines = [f"{what} {summary['loss']:.4f}, perplexity {summary['perplexity']:.2f} ({summary['tokens']} tokens)"]
    if "layers" not in summary:
        return "\n".join(lines)
    per_layer = ", ".join(f"{layer['experts_per_token']:.2f}" for layer in summary["layers"])
    if moe.router == "topk":  # its compute is its k: nothing to compare with itself
        return "\n".join(lines + [f"top-{moe.top_k} routing over {moe.num_experts} experts: "
                                  f"{summary['moe_flops_per_token'] / 1e6:.2f}M expert FLOPs per token"])
    ratio = summary["moe_flops_ratio"]
    verdict = f"{1 - ratio:.0%} saved" if ratio <= 1 else f"{ratio:.2f}x its compute: nothing saved yet"
    median_top1 = statistics.fmean(layer["top1_quartiles"][1] for layer in summary["layers"])
    capped, last_train = "", last_train or {}
    kept, wanted = last_train.get("experts_per_token"), last_train.get("wanted_experts_per_token")
    if kept is not None and wanted is not None and wanted > kept + 0.005 and moe.eval_capacity_factor is None:
        capped = (f"; evaluated dropless, where training's capacity dropped pairs ({wanted:.2f} wanted, {kept:.2f} "
                  f"kept in its last logged step: the progress bar's count)")
    lines += [
        f"experts per token: {summary['experts_per_token']:.2f} on average (per MoE layer: {per_layer}){capped}",
        f"MoE expert FLOPs per token: {summary['moe_flops_per_token'] / 1e6:.2f}M = {ratio:.1%} of "
        f"{flops_baseline(moe)} ({verdict})",
        f"router confidence: median top-1 probability {median_top1:.3f} "
        f"(1/E = {1 / len(summary['layers'][0]['tokens_per_expert']):.3f} is a uniform router)",
    ]
    if ratio > 1:
        budget = "" if moe.target_experts or sharpened else "hold the compute with a budget (--model.moe.target_experts=2, docs/method.md), "
        lines.append("  the router is still unsure, so the threshold rule engages many experts; XMoE's saving "
                     "comes as training sharpens it (the paper trains 60k steps). Train longer "
                     f"(--train.max_steps), {budget}or lower the threshold at inference (see the sweep).")
    return "\n".join(lines)


def describe_mt_eval(final: dict, *, bleu_sentences: int) -> str:
    """The last evaluation of a translation run in words (``bleu_sentences``: how many
    validation sentences BLEU and chrF++ were computed on)."""
    line = f"validation loss {final['loss']:.4f}"
    if "bleu" in final:
        line += f", greedy BLEU {final['bleu']:.2f}, chrF++ {final['chrf']:.2f} (first {bleu_sentences} sentences)"
    if "experts_per_token" in final:
        line += (f"\nexperts per token {final['experts_per_token']:.2f}; MoE FLOPs {final['moe_flops_ratio']:.1%} "
                 f"of the top-k model of equal parameters")
    return line

