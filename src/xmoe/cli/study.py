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

import functools
import json

from xmoe.errors import UsageError


def study(name: str, /, *, data: str | None = None, out: str | None = None, seeds: int = 3, sweep_seeds: int = 1,
          scale: str = "cpu", steps: int | None = None, plan: bool = False, progress: bool = False,
          tabulate: bool = False, config: dict[str, str]) -> None:
    """Run a study of XMoE's claims: train, evaluate, tables + plots.

    Args:
        name: which study (all = the three, sharing runs; sharpen: the router-sharpening options;
            budget: XMoE against top-k at equal average compute)
        data: text file, folder or .jsonl (default: Python's own docs)
        out: output folder (default: runs/study/SCALE-CORPUS)
        seeds: seeds of the main comparison (default 3)
        sweep_seeds: seeds of the threshold/granularity sweeps (default 1)
        scale: cpu: shrunk cpu-* family (about an hour for `all` on 2 cores); gpt2: the paper's
            GPT-2-small family and recipe (GPUs); debug: seconds, for tests
        steps: optimizer steps per run (default: the scale's)
        plan: print the runs and their overrides as JSON; train nothing
        progress: a progress bar per run
        tabulate: budget: write the tables and plots of the runs finished so far; train nothing
    """
    from xmoe.study import default_out, plan_study, run_study

    if tabulate and name != "budget":
        raise UsageError("--tabulate belongs to xmoe study budget; the other studies tabulate when they finish")
    if name in ("sharpen", "budget"):
        if scale != "cpu" or sweep_seeds != 1:
            raise UsageError(f"xmoe study {name} has its own scale and no sweep seeds; drop --scale and --sweep-seeds")
        return _own_scale(name, out=out or default_out(name, data), data=data, seeds=seeds, steps=steps,
                          overrides=config, plan=plan, progress=progress, tabulate=tabulate)
    common = dict(data=data, seeds=seeds, sweep_seeds=sweep_seeds, scale=scale, steps=steps, overrides=config)
    if plan:
        runs = plan_study(name, **common).runs
        print(json.dumps({"out": str(out or default_out(scale, data)),
                          "runs": {r.name: {"preset": r.preset, "overrides": r.overrides} for r in runs}}, indent=2))
        return
    run_study(name, out=out, progress=progress, **common)


def names() -> tuple[str, ...]:
    """The choices of `xmoe study NAME` (xmoe.study imports torch: read when the command is used)."""
    from xmoe.study import STUDIES

    return (*STUDIES, "sharpen", "budget")


def scales() -> tuple[str, ...]:
    from xmoe.study import SCALES

    return tuple(SCALES)


def _own_scale(name: str, *, out, data: str | None, seeds: int, steps: int | None, overrides: dict[str, str],
               plan: bool, progress: bool, tabulate: bool) -> None:
    """The studies with a scale and seeds plan of their own: sharpen and budget."""
    from xmoe.study import arms, budget, sharpen

    study = sharpen if name == "sharpen" else budget
    if plan:
        extra = arms.study_overrides(name, study.FIXED, steps=steps, data=data, overrides=overrides)
        key = "stage1" if name == "sharpen" else "seed0"  # the runs that start the study
        print(json.dumps({"out": str(out), key: {s.name: {"preset": s.preset, "overrides": s.overrides}
                                                     for s in (arms.spec(a, 0, extra) for a in study.ARMS)}},
                         indent=2))
        return
    run = sharpen.run_sharpen if name == "sharpen" else functools.partial(budget.run_budget, train=not tabulate)
    run(out=out, data=data, seeds=seeds, steps=steps, overrides=overrides, progress=progress)
