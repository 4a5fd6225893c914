"""What the sharpen and budget studies share: their scale, the arm (one training recipe), a run's
spec, the user's overrides, the checks before the first run, and the results' start and writing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from xmoe.errors import UsageError, check_counts
from xmoe.extras import check_extra

from .measure import write_json, write_text
from .plan import CPU, RunSpec, Variant, run_spec

EXPERTS = 64
# Why a run in --out is not one these studies plan (the Runner's refusal names it).
ARM_FLAGS = "this study plans (other --steps, --data, --seeds or --section.field overrides?)"

SCALE = replace(  # the CPU scale's model (d_model 128), trained longer on smaller batches, with a test split
    CPU,
    name="sharpen",
    train={"train.max_steps": "1000", "train.batch_size": "8", "train.seq_len": "64", "train.lr": "2e-3",
           "train.eval_every": "0", "train.save_every": "250", "train.log_every": "10", "train.eval_batches": "20"},
    data={"data.val_fraction": "0.05", "data.test_fraction": "0.05"},
    note="cpu-* family shrunk to d_model 128, FFN 512 (experts 64 x 64); 1,000 steps x 8 x 64 tokens, lr 2e-3",
)


@dataclass(frozen=True, kw_only=True)
class Arm:
    """One training recipe of a study: a model (XMoE or top-k) and the options it turns on."""

    name: str
    router: str = "threshold"
    option: str | None = None  # sharpen: "entropy" or "router_lr"; budget: "budget" or "reference"
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> Variant:
        return Variant(router=self.router, num_experts=EXPERTS)


def spec(arm: Arm, seed: int, extra: dict[str, str]) -> RunSpec:
    """The run of ``arm`` at ``seed``: the scale's family model, the arm's options, then ``extra``."""
    base = run_spec(SCALE, arm.variant, seed, {})
    return RunSpec(name=f"{arm.name}-s{seed}", label=arm.name, variant=arm.variant, seed=seed, preset=base.preset,
                   overrides={**base.overrides, **arm.overrides, **extra})


def study_overrides(study: str, fixed: tuple[str, ...], *, steps: int | None, data: str | None,
                    overrides: dict[str, str] | None) -> dict[str, str]:
    """The user's overrides for every run of ``study`` (``steps``: train.max_steps, ``data``:
    data.path); those that would undo its design (``fixed``) are refused."""
    extra = dict(overrides or {})
    refused = sorted(set(extra) & set(fixed))
    if refused:
        raise UsageError(f"xmoe study {study} sets {', '.join(refused)} itself (the arms, seeds and splits it "
                         f"compares); drop {'it' if len(refused) == 1 else 'them'}")
    if steps is not None:
        check_counts("study", steps=steps)
        extra["train.max_steps"] = str(steps)
    if data is not None:
        extra["data.path"] = str(data)
    return extra


def preflight(arms: tuple[Arm, ...], extra: dict[str, str], *, data: str | None) -> None:
    """What a study checks before its first run: the corpus exists, the plots can be drawn, and
    every arm's config builds (a bad override fails now, not an hour in)."""
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    check_extra("study", "the study's plots")
    for arm in arms:
        spec(arm, 0, extra).config()


def settings(study: str, extra: dict[str, str], seeds: int) -> dict:
    """What results.json says first: the study, its scale, corpus, the user's overrides and the seeds."""
    return {"study": study, "scale_note": SCALE.note,
            "data": extra.get("data.path", "default corpus (Python's reference docs and docstrings)"),
            "overrides": {k: v for k, v in extra.items() if k != "data.path"}, "seeds": list(range(seeds))}


def write_results(results: dict, out: Path, markdown: Callable[[dict], str],
                  draw: Callable[[dict, Path], list[str]]) -> None:
    """results.json and results.md, with the plots ``draw`` makes."""
    results["plots"] = draw(results, out)
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results))


def heading(title: str, results: dict) -> list[str]:
    """The first lines of results.md: the title, the scale, the seeds and the user's overrides."""
    return [f"# {title}, {results['data']}", "",
            f"{results['scale_note']}; seeds {results['seeds']}"
            + (f"; overrides `{json.dumps(results['overrides'])}`" if results["overrides"] else "") + ".", ""]
