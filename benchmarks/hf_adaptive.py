"""The threshold dial on a pretrained-MoE-shaped model, timed (see benchmarks/README.md,
"Hugging Face MoE models: the threshold dial").

A randomly initialised OLMoE (transformers' OlmoeForCausalLM) with OLMoE-1B-7B's MoE block:
hidden 2048, 64 experts of width 1024 (SwiGLU), top-8, here with --layers decoder layers and a
small vocabulary (so the LM head does not dominate). Router weights are drawn with std
--router-std so that the router is peaked like a trained one (at the init's 0.02 it is near
uniform and no threshold engages fewer than ~40 experts).

One forward pass over --batch x --seq tokens (a prefill), in one process, every candidate
interleaved, --reps repetitions, medians:

- the unmodified model with transformers' "eager" and "grouped_mm" experts implementations;
- xmoe.hf.adaptive at threshold 1.0 capped at 8 (exactly the model's top-8; the "xmoe"
  experts implementation), and at the thresholds that give about 2, 4 and 8 experts per token
  on this batch (found by bisection before timing).

Besides the whole forward, the time inside the MoE blocks (router and experts, by hooks) is
reported: attention and the LM head do not change with the routing, so they bound the
whole-model speed-up (Amdahl).

    python benchmarks/hf_adaptive.py [--layers 2] [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from xmoe.hf import adaptive, experts_per_token
from xmoe.hf.adaptive import moe_blocks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--expert-dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--router-std", type=float, default=0.05)
    p.add_argument("--targets", type=float, nargs="+", default=[2, 4, 8], help="experts per token to aim at")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> OlmoeForCausalLM:
    cfg = OlmoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_dim,
                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                      num_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
                      pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(std=args.router_std)
    return model


class MoEClock:
    """Seconds spent inside the MoE blocks (router + experts) during a forward, by hooks."""

    def __init__(self, blocks, *, sync: bool) -> None:
        self.seconds, self.sync, self._start = 0.0, sync, 0.0
        for block in blocks:
            block.register_forward_pre_hook(self._enter)
            block.register_forward_hook(self._leave)

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, *_) -> None:
        self._start = self._now()

    def _leave(self, *_) -> None:
        self.seconds += self._now() - self._start


@torch.no_grad()
def mean_experts(model, x) -> float:
    with experts_per_token(model) as counts:
        model(x, use_cache=False)
    return counts.mean


def threshold_for(model, x, target: float, steps: int = 12) -> tuple[float, float]:
    """The threshold whose mean experts per token on x is closest to ``target`` (bisection)."""
    lo, hi, best = 1e-3, 1.0, None
    for _ in range(steps):
        t = (lo + hi) / 2
        adaptive(model, threshold=t)
        got = mean_experts(model, x)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (t, got)
        lo, hi = (t, hi) if got < target else (lo, t)
    return best


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args)
    x = torch.randint(args.vocab, (args.batch, args.seq), device=args.device)
    blocks = moe_blocks(model)
    own_gates = [b.gate for b in blocks]
    adaptive(model, threshold=1.0, max_experts=args.top_k)
    adapted_gates = [b.gate for b in blocks]
    points = [(t, got) for t, got in (threshold_for(model, x, target) for target in args.targets)]

    def unmodified(impl):
        def setup():
            for b, g in zip(blocks, own_gates):
                b.gate = g
            model.set_experts_implementation(impl)
        return setup

    def adapted(t, cap):
        def setup():
            for b, g in zip(blocks, adapted_gates):
                b.gate = g
            adaptive(model, threshold=t, max_experts=cap)
        return setup

    candidates = {
        f"unmodified top-{args.top_k}, eager": (unmodified("eager"), float(args.top_k)),
        f"unmodified top-{args.top_k}, grouped_mm": (unmodified("grouped_mm"), float(args.top_k)),
        f"adaptive t=1.0 max {args.top_k} (= top-{args.top_k}), xmoe": (adapted(1.0, args.top_k), float(args.top_k)),
        **{f"adaptive t={t:.3f}, xmoe": (adapted(t, None), got) for t, got in points},
    }
    times = {name: [] for name in candidates}
    moe_times = {name: [] for name in candidates}
    clock = MoEClock(blocks, sync=args.device != "cpu")
    with torch.no_grad():
        for name, (setup, _) in candidates.items():  # warm-up
            setup()
            model(x, use_cache=False)
        for _ in range(args.reps):
            for name, (setup, _) in candidates.items():
                setup()
                if args.device != "cpu":
                    torch.cuda.synchronize()
                clock.seconds = 0.0
                start = time.perf_counter()
                model(x, use_cache=False)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                moe_times[name].append(clock.seconds)
    tokens = args.batch * args.seq
    eager = statistics.median(times[f"unmodified top-{args.top_k}, eager"])
    print(f"OLMoE-shaped: {args.layers} layers, hidden {args.hidden}, {args.experts} experts x {args.expert_dim}, "
          f"top-{args.top_k}; {args.batch} x {args.seq} tokens per forward; {args.dtype} on {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}; {args.reps} interleaved reps, medians\n")
    eager_moe = statistics.median(moe_times[f"unmodified top-{args.top_k}, eager"])
    print("| routing, experts implementation | experts/token | ms / forward | tokens/s | speed vs eager "
          "| ms in MoE blocks | MoE blocks vs eager |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, experts) in candidates.items():
        median, moe = statistics.median(times[name]), statistics.median(moe_times[name])
        print(f"| {name} | {experts:.2f} | {1e3 * median:.0f} | {tokens / median:.0f} | {eager / median:.2f}x "
              f"| {1e3 * moe:.0f} | {eager_moe / moe:.2f}x |")


if __name__ == "__main__":
    main()
