"""Dense models made sparse, measured (see benchmarks/README.md, "Dense to sparse").

Trains a CPU-sized dense GPT (cpu-dense) and its split-FFN twin (split8-cpu: every FFN split into
8 experts, trained at t = 1, route 1) on the same data and batches, converts the dense one
(route 2, contiguous and clustered partitions), and prints one table: perplexity and the
fraction of FFN FLOPs per threshold for each, with the wall-clock time per token of the forward
pass next to the dense model's (same process, interleaved repetitions, medians).

    python benchmarks/dense.py [--data PATH] [--out runs/bench-dense] [--steps 400]

Runs already trained in --out are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from xmoe.conversion import ConversionConfig, convert_checkpoint
from xmoe.moe import set_threshold
from xmoe.sweep import gpt_logits, measure_layers, plot_threshold_sweep, sweep, threshold_dial
from xmoe.tasks.lm import eval_batches, lm_run_config, load_lm, train_lm

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="text file or folder (default: Python's own docs)")
    p.add_argument("--out", default="runs/bench-dense", help="folder for the trained and converted runs")
    p.add_argument("--steps", type=int, default=400, help="training steps of each model")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
    p.add_argument("--eval-batches", type=int, default=10, help="validation batches of 16 x 128 tokens")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--reps", type=int, default=7, help="timing repetitions (interleaved; medians)")
    p.add_argument("--results", default=str(RESULTS), help="where dense.md / dense.json / dense.png go")
    return p.parse_args(argv)


def train(preset: str, out: Path, args: argparse.Namespace) -> Path:
    if (out / "checkpoint").exists():
        print(f"reusing {out}", flush=True)
        return out
    overrides = {"train.max_steps": str(args.steps), "train.batch_size": "16", "train.seq_len": "128",
                 "train.lr": "2e-3", "train.eval_every": "0", "train.save_every": "0",
                 "train.eval_batches": "5"}
    if args.data is not None:
        overrides["data.path"] = args.data
    start = time.perf_counter()
    train_lm(lm_run_config(preset, overrides=overrides), out, progress=False)
    print(f"trained {preset} for {args.steps} steps in {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return out


def convert(dense: Path, partition: str, out: Path, args: argparse.Namespace) -> Path:
    if not (out / "checkpoint").exists():
        start = time.perf_counter()
        convert_checkpoint(dense, out, ConversionConfig(num_experts=args.experts, partition=partition),
                           calibration_tokens=args.calibration_tokens, data=None, device="cpu")  # the run's training split
        print(f"converted ({partition}) in {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return out


def time_forward(configs: dict[str, tuple[torch.nn.Module, float | None]], x_BL: torch.Tensor,
                 reps: int) -> dict[str, float]:
    """Median seconds per forward of each (model, threshold), repetitions interleaved."""
    times = {name: [] for name in configs}
    with torch.no_grad():
        for rep in range(reps + 1):  # the first round warms up and is not counted
            for name, (model, t) in configs.items():
                if t is not None:
                    set_threshold(model, t)
                start = time.perf_counter()
                model(x_BL)
                if rep:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.experts != 8:
        raise SystemExit("--experts: route 1 is the split8-cpu preset (8 experts); only --experts 8 compares like with like")
    torch.manual_seed(0)
    out = Path(args.out)
    runs = {"route 1 (split8-cpu, trained at t=1)": train("split8-cpu", out / "split8", args)}
    dense_dir = train("cpu-dense", out / "dense", args)
    runs["route 2 contiguous"] = convert(dense_dir, "contiguous", out / "conv-contiguous", args)
    runs["route 2 clustered"] = convert(dense_dir, "clustered", out / "conv-clustered", args)

    tokenizers = {(path / "tokenizer.json").read_text() for path in (dense_dir, out / "split8")}
    if len(tokenizers) != 1:
        raise SystemExit(f"{out}/dense and {out}/split8 have different tokenizers; delete {out} and re-run")
    dense = load_lm(dense_dir, device="cpu")
    batches = list(eval_batches(dense, None, max_batches=args.eval_batches))
    dense_point = measure_layers(dense.model, batches, gpt_logits)
    models = {name: load_lm(path, device="cpu").model for name, path in runs.items()}
    curves = {name: sweep(args.thresholds, lambda m=model: measure_layers(m, batches, gpt_logits), threshold_dial(model))
              for name, model in models.items()}

    x_BL = batches[0][0]
    configs = {"dense": (dense.model, None)}
    configs.update({f"{name} @ {t:g}": (model, t) for name, model in models.items() for t in args.thresholds})
    seconds = time_forward(configs, x_BL, args.reps)
    tokens = x_BL.numel()
    rows = [{"model": "dense (cpu-dense)", "threshold": None, "perplexity": dense_point.perplexity,
             "ffn_flops_fraction": 1.0, "experts_per_token": None, "us_per_token": 1e6 * seconds["dense"] / tokens}]
    for name, points in curves.items():
        for p in points:
            rows.append({"model": name, "threshold": p.threshold, "perplexity": p.perplexity,
                         "ffn_flops_fraction": p.moe_flops_ratio, "experts_per_token": p.experts_per_token,
                         "us_per_token": 1e6 * seconds[f"{name} @ {p.threshold:g}"] / tokens})
    command = "python " + " ".join(["benchmarks/dense.py", *(argv if argv is not None else sys.argv[1:])])
    write_results(rows, curves, dense_point, command, args, tokens)


def table(rows: list[dict]) -> str:
    dense_us = rows[0]["us_per_token"]
    lines = ["| model | t | FFN FLOPs fraction | experts/token | perplexity | µs/token (forward) | vs dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        experts = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        lines.append(f"| {r['model']} | {t} | {r['ffn_flops_fraction']:.3f} | {experts} | {r['perplexity']:.2f} "
                     f"| {r['us_per_token']:.1f} | {r['us_per_token'] / dense_us:.2f}x |")
    return "\n".join(lines)


def write_results(rows, curves, dense_point, command: str, args: argparse.Namespace, tokens: int) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    print(text)
    plot_threshold_sweep(curves, results / "dense.png", baseline="dense", data="the validation text",
                         dense_perplexity=dense_point.perplexity)
    header = [
        "# Dense to sparse: route 1 (split FFN trained at t = 1) and route 2 (converted dense model)",
        "",
        f"Command: `{command}`",
        "",
        f"{args.steps} training steps per model (batch 16 x 128), {args.experts} experts per FFN, "
        f"{args.calibration_tokens} calibration tokens (the training split), evaluation on "
        f"{args.eval_batches} validation batches; timing: forward pass of one batch of {tokens} tokens, "
        f"CPU fp32, {args.reps} interleaved repetitions, medians. torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
    ]
    (results / "dense.md").write_text("\n".join(header) + text + "\n\nPlot: dense.png\n")
    (results / "dense.json").write_text(json.dumps({"command": command, "args": vars(args), "rows": rows}, indent=1))
    print(f"written: {results / 'dense.md'}, dense.json, dense.png")


if __name__ == "__main__":
    main()
