"""Translation benchmark: CPU-sized XMoE and top-2 models trained on Multi30k en->de with the
same recipe and budget, scored on test_2016_flickr with sacreBLEU (BLEU, chrF++), and their
MoE FLOPs (experts per token, ratio to the top-2 model of equal parameters).

    python benchmarks/mt.py --data ../shared/data/multi30k --steps 1200

Writes benchmarks/results/mt.md and mt.json (the table and the exact command); runs go to
runs/mt-bench/PRESET (checkpoint, spm.model, metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from xmoe.data.translation import read_sentence_pairs
from xmoe.models.seq2seq import num_params
from xmoe.tasks.mt import DecodeConfig, evaluate_mt, load_mt, mt_run_config, train_mt

PRESETS = ("cpu-xmoe-32x512", "cpu-top2-32x512")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train.{en,de}, val.{en,de}, test_2016_flickr.{en,de}")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--runs", default="runs/mt-bench")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def run_one(preset: str, args: argparse.Namespace, data: Path) -> dict:
    s, t = args.src_lang, args.tgt_lang
    overrides = {
        "data.src": str(data / f"train.{s}"), "data.tgt": str(data / f"train.{t}"),
        "data.valid_src": str(data / f"val.{s}"), "data.valid_tgt": str(data / f"val.{t}"),
        "data.vocab_size": str(args.vocab_size), "data.max_tokens": str(args.max_tokens),
        "train.max_steps": str(args.steps), "train.lr": str(args.lr), "train.eval_every": "0",
        "train.save_every": str(args.steps), "train.log_every": "20", "eval_bleu_sentences": "0",
        "train.device": "cpu",
    }
    run_dir = Path(args.runs) / preset
    t0 = time.perf_counter()
    result = train_mt(mt_run_config(preset, overrides=overrides), run_dir, progress=False)
    train_s = time.perf_counter() - t0
    loaded = load_mt(run_dir, device="cpu")
    src, ref = read_sentence_pairs(data / f"test_2016_flickr.{s}", data / f"test_2016_flickr.{t}")
    t0 = time.perf_counter()
    summary, hyps = evaluate_mt(loaded, src, ref, decode=DecodeConfig(beam=args.beam))
    eval_s = time.perf_counter() - t0
    (run_dir / "test_2016_flickr.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    summary.pop("layers", None)
    return {"preset": preset, "params": num_params(loaded.model), "steps": result.steps,
            "train_minutes": train_s / 60, "eval_minutes": eval_s / 60,
            "final_train_loss": result.train_losses[-1], "val_loss": result.final_eval["loss"], **summary}


def table(rows: list[dict]) -> str:
    lines = ["| model | params | steps | train min | val CE | test BLEU | test chrF++ | experts/token | "
             "MoE MFLOPs/token | vs top-2 budget |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['steps']} | {r['train_minutes']:.1f} | "
            f"{r['val_loss']:.3f} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['experts_per_token']:.2f} | "
            f"{r['moe_flops_per_token'] / 1e6:.2f} | {r['moe_flops_ratio']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data)
    rows = []
    for preset in args.presets:
        rows.append(run_one(preset, args, data))
        print(table(rows), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    (out / "mt.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    signatures = f"BLEU: {rows[0]['bleu_signature']}\nchrF++: {rows[0]['chrf_signature']}"
    (out / "mt.md").write_text(
        f"# Translation: Multi30k {args.src_lang}->{args.tgt_lang}, test_2016_flickr\n\n```bash\n{command}\n```\n\n"
        f"Machine: {machine}. Beam {args.beam}, dropless routing at evaluation.\n\n{table(rows)}\n\n"
        f"```\n{signatures}\n```\n")
    print(f"wrote {out / 'mt.md'} and {out / 'mt.json'}")


if __name__ == "__main__":
    main()
