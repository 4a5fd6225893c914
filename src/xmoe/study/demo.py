"""`xmoe demo`, the main job: XMoE with a compute budget, and top-k over the same experts at the
compute XMoE measured, trained on the same tokens of text that ships with Python, compared; then
XMoE's compute dial (its threshold sweep, xmoe.sweep).

    run_demo(preset="cpu-xmoe-64x128", steps=200, data=None, out="runs/demo", train=...)

A small plan run by the studies' runner (xmoe.study.runner): the run ``xmoe``, then one run
``topK`` for each baseline k, which XMoE's measured experts per token decides; each is trained
into ``out/NAME``. A stopped demo continues model by model: a model trained to ``steps`` is left
as it is. ``train(cfg, run_dir, resume=, go_on=)`` trains one model and prints its evaluation
(the `xmoe train` command's, which the CLI passes in).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from xmoe.errors import UsageError

from .plan import RunSpec
from .runner import Runner

# The compute budget the demo trains XMoE with (MoEConfig.target_experts, beyond the paper;
# --paper-recipe trains the paper's fixed t = 0.9): see docs/results.md, "At the same compute".
DEMO_BUDGET = 2.0
DEMO_STEPS = 200  # per model: XMoE and its one or two compute-matched top-k models fit about 5 minutes
DEMO_SEQ_LEN = 128  # tokens per sequence, or the preset's context where it is shorter (debug-xmoe: 64)
DEMO_TRAIN = {"train.batch_size": "8", "train.eval_every": "100", "train.save_every": "100", "train.lr": "2e-3"}
SPEED_BATCHES = 4  # validation batches the closing speed columns are measured on
# Why a run in --out is not the one this demo plans: a --resume without the flags the demo started with.
DEMO_FLAGS = ("this demo plans (other --preset, --steps, --data or --paper-recipe? continue a demo with the flags "
              "it started with and --resume)")


def run_demo(*, preset: str, steps: int | None, data: str | None, out: str | os.PathLike, paper_recipe: bool,
             resume: bool, go_on: str, train: Callable[..., None]) -> None:
    """Train XMoE (``preset``) and its compute-matched top-k baselines for ``steps`` steps each on
    ``data`` (None: Python's own docs) into ``out``, print the dial and the closing comparison;
    ``go_on``: the command that continues the demo if it is stopped; ``steps`` None: DEMO_STEPS."""
    from xmoe.tasks.lm import eval_batches, evaluate_lm, lm_run_config, load_lm
    from .compare import compute_matched_k, describe_comparison, interleaved_speeds
    from xmoe.report import write_report

    steps = DEMO_STEPS if steps is None else steps
    if steps < 1:
        raise UsageError(f"--steps must be a positive number of training steps, got {steps}")
    out = Path(out)
    if not resume and (out / "xmoe" / "checkpoint").exists():
        raise UsageError(f"{out} already holds a demo; continue it with --resume, or pass --out NEW_DIR "
                         f"(or delete {out})")
    model = lm_run_config(preset).model
    if model.moe is None or model.moe.router != "threshold":
        raise UsageError(f"--preset {preset} is not an XMoE preset; pick a *-xmoe-* one (xmoe presets)")
    seq_len = min(DEMO_SEQ_LEN, model.block_size)
    common = {"train.max_steps": str(steps), "train.seq_len": str(seq_len), **DEMO_TRAIN,
              **({} if data is None else {"data.path": data})}
    budget = {} if paper_recipe else {"model.moe.target_experts": f"{DEMO_BUDGET:g}"}
    xmoe_run = RunSpec(name="xmoe", preset=preset, overrides={**common, **budget})
    xmoe_cfg = xmoe_run.config()
    moe = xmoe_cfg.model.moe

    runner = Runner(out, trainer=functools.partial(train, go_on=go_on), planned=DEMO_FLAGS)
    print(_recipe(moe, paper_recipe))
    runner.train(xmoe_run)
    xmoe = load_lm(runner.run_dir(xmoe_run))
    batches = list(eval_batches(xmoe, None, max_batches=xmoe_cfg.train.eval_batches))
    evals = {"xmoe": evaluate_lm(xmoe.model, batches).to_dict()}
    ks = compute_matched_k(evals["xmoe"]["experts_per_token"], moe.num_experts)
    print(f"\nthe baselines: top-{' and top-'.join(map(str, ks))} over the same {moe.num_experts} experts, the "
          f"compute XMoE measured ({evals['xmoe']['experts_per_token']:.2f} experts per token on validation), "
          f"trained on the same tokens")
    models = {}
    for k in ks:
        topk = RunSpec(name=f"top{k}", preset=preset,
                       overrides={**common, "model.moe.router": "topk", "model.moe.top_k": str(k)})
        runner.train(topk)
        models[f"top-{k}"] = load_lm(runner.run_dir(topk)).model
        evals[f"top-{k}"] = evaluate_lm(models[f"top-{k}"], batches).to_dict()

    print("\nthe compute dial: XMoE evaluated at other thresholds (dropless)")
    trained = _dial(xmoe, batches, out / "xmoe" / "report")
    write_report(out / "xmoe")  # again, now with the sweep in summary.md
    label = (f"XMoE t = {moe.threshold:g} (the paper's recipe)" if paper_recipe else
             f"XMoE, budget {DEMO_BUDGET:g} experts/token (t trained to {trained:.3f})")
    speeds = interleaved_speeds({label: xmoe.model, **models}, batches[:SPEED_BATCHES])
    print("\n" + describe_comparison((label, evals["xmoe"]), {k: v for k, v in evals.items() if k != "xmoe"},
                                     speeds=speeds, flops_per_expert=moe.flops_per_pair * len(xmoe.model.moe_layers())))


def _dial(xmoe, batches: list, report: Path) -> float:
    """XMoE's threshold sweep into ``report``, around the t training left (a budget's t differs
    per layer and can be far below the paper's 0.9), and the paper's t and 1.0 (every expert);
    then each layer's dial back at its trained t. Returns the trained t, averaged over layers."""
    from xmoe.study.measure import sweep_run

    dials = [layer.router.dial for layer in xmoe.model.moe_layers()]
    trained = [float(dial.threshold) for dial in dials]
    mean = sum(trained) / len(trained)
    around = [round(mean * f, 3) for f in (0.5, 1.0, 2.0, 4.0) if mean * f < 0.9]
    sweep_run(xmoe, sorted({*around, 0.9, 1.0}), batches, report)
    for dial, t in zip(dials, trained):
        dial.set_threshold(t)
    return mean


def _recipe(moe, paper: bool) -> str:
    experts = f"XMoE: {moe.num_experts} experts of width {moe.expert_dim}"
    if paper:
        return (f"{experts}, threshold t = {moe.threshold:g}: the paper's recipe (without --paper-recipe a budget "
                f"controller holds the mean experts per token)")
    return (f"{experts}, threshold router with a compute budget: t is steered in training so that tokens take "
            f"{DEMO_BUDGET:g} experts on average, each its own number (beyond the paper, docs/method.md; "
            f"--paper-recipe trains the paper's fixed t = {moe.threshold:g})")
