"""`xmoe <command>`: one small function per command; the work lives in the library.

    xmoe demo                                   the main job: XMoE and top-k trained, compared (CPU, minutes)
    xmoe train --preset cpu-xmoe-64x128 --out runs/a [--data.path=PATH] [--resume] [--train.max_steps=200 ...]
    xmoe train --nproc 2 --ep-size 2 ...        the same on 2 processes, experts split over them (torchrun)
    xmoe eval --checkpoint runs/a [--data PATH] [--threshold 0.7] [--capacity]
    xmoe sweep-threshold --checkpoint runs/a [--thresholds 0.5 0.7 0.9 1.0]
    xmoe generate --checkpoint runs/a --prompt "def "
    xmoe report runs/a
    xmoe convert --checkpoint runs/dense --experts 8 --out runs/dense-x8 [--partition clustered]
    xmoe export-hf --checkpoint runs/a --out hf/a   a Hugging Face folder (see xmoe.cli.hf)
    xmoe presets
    xmoe train-mt / translate / eval-mt         translation (see xmoe.cli.mt)
    xmoe bench layer / decode

`train`, `train-mt` and `study` take every field of the run config as a dotted flag
(--train.max_steps=200, --model.moe.threshold=0.8; xmoe.training.config reads each value as its
field's type), and nothing else sets those fields: one spelling per setting.
A mistake the user can fix (xmoe.UsageError, a checkpoint or file that is not there) is one line
and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

from xmoe.cli.flags import CommandParser, add_train_command, run_config
from xmoe.errors import CheckpointError, UsageError


def cmd_presets(args: argparse.Namespace) -> None:
    from xmoe.presets import list_mt_presets, list_presets

    for title, rows in (("language-model presets (xmoe train --preset P)", list_presets()),
                        ("translation presets (xmoe train-mt --preset P)", list_mt_presets())):
        print(f"{title}:\n")
        print("| preset | layers | experts | params | forward GFLOPs/token | MoE expert MFLOPs/token (top-k budget) |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            forward = "" if row.flops_per_token is None else f"{row.flops_per_token / 1e9:.3f}"
            print(f"| {row.name} | {row.layers} | {row.experts} | {row.params / 1e6:.1f}M | {forward} "
                  f"| {row.moe_flops_per_token / 1e6:.1f} |")
        print()


def cmd_train(args: argparse.Namespace) -> None:
    from xmoe.cli import launch

    if args.nproc != 1 and not launch.under_torchrun():
        sys.exit(launch.relaunch(args))
    train_and_report(run_config(args), Path(args.out), resume=args.resume, ep_size=args.ep_size)


def train_and_report(cfg, out: Path, *, resume: bool = False, ep_size: int = 1, go_on: str | None = None) -> None:
    """Train the language model ``cfg`` into ``out`` (on every rank under torchrun), then print
    its evaluation and write its report; ``go_on``: the command that continues it, if stopped,
    when it is not ``xmoe train --out OUT --resume``."""
    from xmoe.cli import launch
    from xmoe.training import train_lm
    from xmoe.training.report import describe_eval, write_report
    from xmoe.training.stopping import exit_if_interrupted

    with launch.parallel_context(ep_size, cfg.train) as parallel:
        main_rank = parallel is None or parallel.is_main
        if main_rank:
            ranks = "" if parallel is None else f" on {parallel.world_size} ranks (ep {ep_size})"
            print(f"training {cfg.preset} on {cfg.data.path or 'the default corpus'}{ranks} -> {out}")
        result = train_lm(cfg, out, resume=resume, parallel=parallel)
    if not main_rank:
        return
    if go_on is None and parallel is not None:  # the same processes and layout continue it
        go_on = f"xmoe train --nproc {parallel.world_size} --ep-size {ep_size} --out {out} --resume"
    exit_if_interrupted(result, cfg.train.max_steps, out, train="xmoe train", evaluate="xmoe eval", resume=go_on)
    print(describe_eval(result.final_eval, cfg.model.moe, sharpened=cfg.train.entropy_loss_coef > 0))
    print(f"report: {write_report(out)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from xmoe.cli import hf as hf_cli

    checkpoint = _checkpoint(args, "eval", takes=("run", "hf", "hub"))
    if checkpoint.is_hugging_face:
        return hf_cli.cmd_eval(args, checkpoint)
    from xmoe.checkpoints import training_capacity
    from xmoe.training import eval_batches, evaluate_lm

    loaded = _load_run(args, checkpoint)
    with training_capacity(loaded.model) if args.capacity else contextlib.nullcontext():
        result = evaluate_lm(loaded.model, eval_batches(loaded, args.data, max_batches=args.max_batches))
    summary = result.to_dict()
    if args.json:
        print(json.dumps({"data": _text_name(args.data), **summary}, indent=2))
    else:
        from xmoe.training.report import describe_eval

        print(describe_eval(summary, loaded.model.cfg.moe, on=None if args.data is None else repr(args.data)))


def cmd_sweep(args: argparse.Namespace) -> None:
    from xmoe.cli import hf as hf_cli

    checkpoint = _checkpoint(args, "sweep-threshold", takes=("run", "converted", "hf", "hub"))
    if checkpoint.is_hugging_face:
        return hf_cli.cmd_sweep(args, checkpoint)
    if checkpoint.kind == "converted":
        return _sweep_converted(args)
    from xmoe.checkpoints import training_capacity
    from xmoe.study.measure import sweep_run
    from xmoe.training import eval_batches

    loaded = _load_run(args, checkpoint)
    with training_capacity(loaded.model) if args.capacity else contextlib.nullcontext():
        sweep_run(loaded, args.thresholds, eval_batches(loaded, args.data, max_batches=args.max_batches),
                  Path(args.out or Path(loaded.run_dir) / "report"), data=args.data)


def _sweep_converted(args: argparse.Namespace) -> None:
    """sweep-threshold on a Hugging Face model converted by `xmoe convert`: the report goes to
    --out or the current folder, never into the model's folder."""
    from xmoe.cli.hf import check_folder_args, refuse_max_experts
    from xmoe.conversion.hf import sweep_converted
    from xmoe.sweep import write_sweep
    from xmoe.training.loop import resolve_device

    check_folder_args(args, kind="a converted Hugging Face model")
    refuse_max_experts(args, "a converted Hugging Face model")
    points = sweep_converted(args.checkpoint, args.data, args.thresholds, max_batches=args.max_batches or 8,
                             device=resolve_device(args.device))
    write_sweep(points, args.out or ".", data=args.data, step=None, baseline="dense")


def _text_name(data: str | None) -> str:
    """How output names the evaluation text: the run's validation split, or the file given."""
    return "the validation text" if data is None else repr(data)


def cmd_generate(args: argparse.Namespace) -> None:
    from xmoe.cli import hf as hf_cli

    checkpoint = _checkpoint(args, "generate", takes=("run", "hf", "hub"))
    if checkpoint.is_hugging_face:
        return hf_cli.cmd_generate(args, checkpoint)
    import torch

    loaded = _load_run(args, checkpoint)
    tokenizer = loaded.vocab
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt is empty; give some text to continue")
    from xmoe.bench.decode import generation_report

    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with generation_report(loaded.model, args.max_new_tokens):
        out = loaded.model.generate(torch.tensor([ids], device=device), args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    generator=generator)
    print(tokenizer.decode(out[0].tolist()))


def cmd_report(args: argparse.Namespace) -> None:
    from xmoe.training.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job (xmoe.study.demo), each model trained as `xmoe train` trains it."""
    from xmoe.study.demo import run_demo

    go_on = " ".join(["xmoe", *args.argv, *([] if args.resume else ["--resume"])])
    run_demo(preset=args.preset or _lm_task().default_preset, steps=args.steps, data=args.data, out=args.out,
             paper_recipe=args.paper_recipe, resume=args.resume, go_on=go_on, train=train_and_report)


def cmd_bench_layer(args: argparse.Namespace) -> None:
    from xmoe.bench import layer

    layer.run(args)


def cmd_bench_decode(args: argparse.Namespace) -> None:
    from xmoe.bench import decode

    decode.run(args)


def _checkpoint(args: argparse.Namespace, command: str, *, takes: tuple[str, ...]):
    """What --checkpoint holds (xmoe.checkpoint_kind), refused unless ``command`` takes it."""
    from xmoe.checkpoints import checkpoint_kind, expect

    checkpoint = checkpoint_kind(args.checkpoint)
    expect(checkpoint, takes, command)
    return checkpoint


def _load_run(args: argparse.Namespace, checkpoint):
    """The `xmoe train` run at --checkpoint, with --threshold applied; --capacity is checked."""
    from xmoe.checkpoints import has_capacity, open_checkpoint, set_threshold

    from xmoe.cli.hf import refuse_max_experts

    refuse_max_experts(args, "an `xmoe train` run")
    loaded = open_checkpoint(checkpoint, device=args.device).run
    if getattr(args, "threshold", None) is not None:
        set_threshold(loaded.model, args.threshold, args.checkpoint)
    if getattr(args, "capacity", False) and not has_capacity(loaded.model):
        raise UsageError(f"--capacity: {args.checkpoint} was trained without capacity (dense or dropless)")
    return loaded


def _diverged_checkpoint(path: str, err: FloatingPointError) -> str:
    """What a NaN or inf met while using a checkpoint means: its weights diverged in training."""
    from xmoe.training import CheckpointError, checkpoint_dir
    from xmoe.training.checkpoint import read_state

    try:
        at = f" (checkpoint at step {read_state(checkpoint_dir(path))['step']})"
    except CheckpointError:
        at = ""
    cause = str(err).split(",")[0].split(";")[0]
    return (f"the model in {path} computes NaN or inf ({cause}): its weights diverged during training{at}; "
            f"train it again with a lower train.lr")


def build_parser() -> argparse.ArgumentParser:
    """The `xmoe` parser. Building it imports nothing heavy (``CommandParser``): a command's
    torch-dependent flags are added when that command is used."""
    parser = argparse.ArgumentParser(prog="xmoe", description="XMoE: sparse MoE with a threshold router",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    from xmoe.cli import launch

    p = commands.add_parser("demo", help="the main job: train a CPU-sized XMoE LM, evaluate, report")
    p.add_argument("--preset", default=None, help="an XMoE language-model preset (default: xmoe train's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the demo's, "
                                                          "about 4 minutes on 2 cores for the three models)")
    p.add_argument("--data", default=None, help="text file, folder or .jsonl (default: Python's own docs)")
    p.add_argument("--out", default="runs/demo", help="runs/demo/xmoe and runs/demo/topK for each baseline k")
    p.add_argument("--paper-recipe", action="store_true",
                   help="train XMoE with the paper's fixed t = 0.9 (no budget controller); after a few hundred "
                        "steps its router engages many experts, and the compute-matched top-k as many")
    p.add_argument("--resume", action="store_true", help="continue a demo in --out that was stopped")
    p.set_defaults(func=cmd_demo)

    p = add_train_command(commands, "train", cmd_train, _lm_task, renamed={"data": "data.path"},
                          help="train a GPT preset", out="checkpoint, tokenizer, metrics, report")
    launch.add_arguments(p)
    for name, func, help_ in (("eval", cmd_eval, "perplexity, experts per token and MoE FLOPs of a checkpoint"),
                              ("sweep-threshold", cmd_sweep, "perplexity and MoE FLOPs for several thresholds")):
        p = commands.add_parser(name, help=help_)
        p.add_argument("--checkpoint", required=True, help="run folder (or its checkpoint folder)")
        p.add_argument("--data", default=None, help="evaluate on this text instead of the run's validation split")
        p.add_argument("--max-batches", type=int, default=None)
        p.add_argument("--capacity", action="store_true",
                       help="apply the training capacity (default: dropless, so no token depends on its neighbours)")
        p.add_argument("--device", default="auto")
        p.set_defaults(func=func)
    commands.choices["eval"].add_argument("--threshold", type=float, default=None, help="change t at inference")
    commands.choices["eval"].add_argument("--json", action="store_true", help="print the full result as JSON")
    commands.choices["sweep-threshold"].add_argument(
        "--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0])
    commands.choices["sweep-threshold"].add_argument(
        "--out", default=None, help="default: RUN/report for an xmoe run; the current folder for a Hugging Face "
                                    "or converted model (never the model's folder)")

    p = commands.add_parser("generate", help="sample text from a checkpoint (KV cache); speed and experts per "
                                             "token to stderr")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="change t at inference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("report", help="plots and a markdown summary of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default: RUN/report")
    p.set_defaults(func=cmd_report)

    from xmoe.cli import convert

    convert.add_command(commands)

    from xmoe.cli import hf as hf_cli

    hf_cli.add_commands(commands)  # export-hf; eval / sweep-threshold / generate on Hugging Face MoE folders

    from xmoe.cli.study import add_parser as add_study_parser

    add_study_parser(commands)

    p = commands.add_parser("presets", help="list model presets with parameters and FLOPs")
    p.set_defaults(func=cmd_presets)

    from xmoe.cli.mt import add_mt_commands

    add_mt_commands(commands)  # train-mt, translate, eval-mt

    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="KIND", parser_class=CommandParser)
    p = kinds.add_parser("layer", help="MoE layer speed against the speed limit and baselines")
    p.later(lambda p: importlib.import_module("xmoe.bench.layer").add_arguments(p))
    p.set_defaults(func=cmd_bench_layer)
    p = kinds.add_parser("decode", help="decode speed (a few tokens per call) against the active-weights floor")
    p.later(lambda p: importlib.import_module("xmoe.bench.decode").add_arguments(p))
    p.set_defaults(func=cmd_bench_decode)
    for command in _leaf_parsers(commands):
        command.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return parser


def _lm_task():
    from xmoe.training.lm import LM_TASK

    return LM_TASK


THREADS_HELP = ("torch CPU threads (default: torch's, one per core). On a machine shared with other jobs, "
                "use 1: threads otherwise wait for each other while another job holds a core "
                "(measured in benchmarks/README.md)")


def _leaf_parsers(commands: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every command's parser (`bench layer`, not `bench`), so each takes the common options."""
    leaves = []
    for p in dict.fromkeys(commands.choices.values()):  # aliases map to the same parser
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += _leaf_parsers(nested[0]) if nested else [p]
    return leaves


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _reject(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """Arguments no option took: a renamed flag names its new spelling, a mistyped config key
    its closest real ones."""
    keys = [arg[2:].partition("=")[0] for arg in rest if arg.startswith("--")]
    for key in keys:
        if key in getattr(args, "renamed", {}):
            new = args.renamed[key]
            raise UsageError(f"--{key} is now --{new}: write --{new}=VALUE")
    if getattr(args, "config_class", None) is not None:
        from xmoe.training.config import check_config_keys

        check_config_keys(args.config_class, keys)
    parser.error(f"unrecognized arguments: {' '.join(rest)}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():  # puts showwarning back when main returns
        # Warnings are messages to the user here: one line each, without the source line.
        warnings.showwarning = lambda message, *_, **__: print(f"xmoe {args.command}: warning: {message}",
                                                               file=sys.stderr)
        _run(parser, args, rest)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """Run the command; the errors a user can fix become one line and exit status 2."""
    try:
        _set_threads(args.threads)
        if rest:
            _reject(parser, args, rest)
        args.func(args)
    except FloatingPointError as err:
        if getattr(args, "checkpoint", None) is not None:  # training says which step diverged itself
            err = _diverged_checkpoint(args.checkpoint, err)
        print(f"xmoe {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `xmoe presets | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)
    except OSError as err:
        if isinstance(err, (FileNotFoundError, FileExistsError)):
            _user_error(args, err)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _user_error(args, f"no space left on the device: {err}")
    except KeyboardInterrupt as err:  # outside training (which saves and exits itself): nothing to save
        from xmoe.training.stopping import exit_code, signal_name

        signum = getattr(err, "signum", None)
        print(f"\nxmoe {args.command}: {signal_name(signum)}", file=sys.stderr)
        sys.exit(exit_code(signum))
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        _user_error(args, err)


def _user_error(args: argparse.Namespace, message) -> None:
    print(f"xmoe {args.command}: error: {message}", file=sys.stderr)
    sys.exit(2)


# Errors a user can fix that are defined beside the code raising them, by module: a module not
# imported by the command raised none, so the CLI need not import it to recognise them.
_USER_ERRORS_IN = {"xmoe.training.runs": "RunInUseError", "xmoe.distributed.parallel": "RanksLost"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from xmoe.extras import MissingExtra

    found = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS_IN.items()
                  if module in sys.modules)
    return (UsageError, CheckpointError, MissingExtra, *found)


if __name__ == "__main__":
    main(sys.argv[1:])
