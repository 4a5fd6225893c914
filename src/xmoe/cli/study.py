"""`xmoe study NAME`: train, evaluate and tabulate one study of XMoE's LM claims (xmoe.study).

    xmoe study main                     parameter-matched family, 3 seeds (CPU scale)
    xmoe study threshold                t swept at training time and at inference only
    xmoe study granularity              experts of width F, F/2, F/4, F/8 at equal parameters
    xmoe study all --data tinyshakespeare/input.txt
    xmoe study all --scale gpt2 --plan  GPT-2-small configs with the paper's recipe (print only)
    xmoe study sharpen --data input.txt router-sharpening options against the paper and top-k,
                                        chosen on validation, reported on a held-out test split
    xmoe study budget --data input.txt  XMoE at a compute budget (1.5, 2, 4 experts/token) against
                                        top-k at the same compute (k = 1, 2, 4), on a test split
    xmoe study budget --tabulate        the tables and plots of the runs finished so far

Re-running the same command resumes: finished runs in --out are skipped.
"""

from __future__ import annotations

import argparse
import json

from xmoe.cli.flags import add_config_flags, config_overrides
from xmoe.errors import UsageError


def add_parser(commands) -> None:
    """Register `xmoe study` on the CLI's subcommands (its choices and config flags are added
    when it is used: they come from modules that import torch)."""
    p = commands.add_parser("study", help="run a study of XMoE's claims: train, evaluate, tables + plots",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    p.later(_add_arguments)
    p.set_defaults(func=cmd_study)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from xmoe.study import SCALES, STUDIES
    from xmoe.training import LMRunConfig

    p.add_argument("name", choices=(*STUDIES, "sharpen", "budget"),
                   help="which study (all = the three, sharing runs; sharpen: the router-sharpening options; "
                        "budget: XMoE against top-k at equal average compute)")
    p.add_argument("--data", default=None, help="text file, folder or .jsonl (default: Python's own docs)")
    p.add_argument("--out", default=None, help="output folder (default: runs/study/SCALE-CORPUS)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main comparison (default 3)")
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds of the threshold/granularity sweeps (default 1)")
    p.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="cpu: shrunk cpu-* family (about an hour for `all` on 2 cores); gpt2: the paper's "
                        "GPT-2-small family and recipe (GPUs); debug: seconds, for tests")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the scale's)")
    p.add_argument("--plan", action="store_true", help="print the runs and their overrides as JSON; train nothing")
    p.add_argument("--progress", action="store_true", help="a progress bar per run")
    p.add_argument("--tabulate", action="store_true",
                   help="budget: write the tables and plots of the runs finished so far; train nothing")
    add_config_flags(p, LMRunConfig)  # on top of the study's own, for every run


def cmd_study(args: argparse.Namespace) -> None:
    from xmoe.study import default_out, plan_study, run_study

    if args.tabulate and args.name != "budget":
        raise UsageError("--tabulate belongs to xmoe study budget; the other studies tabulate when they finish")
    if args.name in ("sharpen", "budget"):
        _own_scale(args, config_overrides(args))
        return
    common = dict(data=args.data, seeds=args.seeds, sweep_seeds=args.sweep_seeds, scale=args.scale,
                  steps=args.steps, overrides=config_overrides(args))
    if args.plan:
        plan = plan_study(args.name, **common)
        print(json.dumps({"out": str(args.out or default_out(args.scale, args.data)),
                          "runs": {r.name: {"preset": r.preset, "overrides": r.overrides} for r in plan.runs}},
                         indent=2))
        return
    run_study(args.name, out=args.out, progress=args.progress, **common)


def _own_scale(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """The studies with a scale and seeds plan of their own: sharpen and budget."""
    from xmoe.study import default_out

    if args.name == "sharpen":
        from xmoe.study.sharpen import ARMS, run_sharpen as run, spec, study_overrides as plan_overrides
    else:
        from xmoe.study.budget import ARMS, _overrides as plan_overrides, run_budget as run, spec
    if args.scale != "cpu" or args.sweep_seeds != 1:
        raise UsageError(f"xmoe study {args.name} has its own scale and no sweep seeds; drop --scale and --sweep-seeds")
    out = args.out or default_out(args.name, args.data)
    if args.plan:
        extra = plan_overrides(steps=args.steps, data=args.data, overrides=overrides)
        key = "stage1" if args.name == "sharpen" else "seed0"  # the runs that start the study
        print(json.dumps({"out": str(out), key: {s.name: {"preset": s.preset, "overrides": s.overrides}
                                                     for s in (spec(a, 0, extra) for a in ARMS)}}, indent=2))
        return
    extra = {"train": not args.tabulate} if args.name == "budget" else {}
    run(out=out, data=args.data, seeds=args.seeds, steps=args.steps, overrides=overrides, progress=args.progress,
        **extra)
