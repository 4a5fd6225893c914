"""What the small-scale XMoE study trains: scales, model variants, and the runs of each study.

XMoE (Yang et al., 2024, arXiv 2403.18926) claims, for language modelling at equal parameters
(Sec. 4, Table 1 and the threshold/granularity analyses; docs/method.md, "The paper's experiments"):

    main         XMoE 16/32/64 experts at t = 0.9 reach lower perplexity than Switch (top-1, 8
                 experts) and top-k (16 experts k=2, 64 experts k=8), with under half of their
                 MoE FLOPs; a dense model of the same width as the reference.
    threshold    t trades compute for quality: swept at training time (one model per t) and at
                 inference only (one model trained at t = 0.9, evaluated at several t).
    granularity  smaller experts at equal total parameters (width F, F/2, F/4, F/8) help.

A run is one (variant, seed) on one scale and corpus; its name ("xmoe-64x64-t0.9-s0") is the
same in every study that needs it, so `all` trains each model once. Every run is an
``lm_run_config(preset, overrides=...)``: the overrides are the whole record of what was changed.
Expert widths come from ``family_moe`` (the one definition of the parameter-matched family).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xmoe.errors import UsageError, check_counts
from xmoe.presets.gpt import PRESETS, family_moe, get_preset
from xmoe.tasks.lm import LMRunConfig, lm_run_config

STUDIES = ("main", "threshold", "granularity", "all")
MAIN_THRESHOLD = 0.9  # the paper's t
TRAIN_THRESHOLDS = (0.5, 0.7, 0.9, 1.0)  # one model trained per t
INFERENCE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # one model (t = 0.9), evaluated at each
GRANULARITY_EXPERTS = (8, 16, 32, 64)  # widths F, F/2, F/4, F/8 at equal total parameters
SWEEP_EXPERTS = 64  # the threshold sweeps use the paper's finest XMoE (64 experts)


@dataclass(frozen=True, kw_only=True)
class Scale:
    """A model size and training recipe for every run of a study.

    ``family`` is the preset prefix (``cpu-dense``, ``cpu-xmoe-64x128``, ...); ``model``,
    ``train`` and ``data`` are dotted overrides applied to every run (e.g. a uniform shrink);
    ``d_ff`` is the dense FFN width after them, from which the expert widths are cut.
    """

    name: str
    family: str
    d_ff: int
    model: dict[str, str] = field(default_factory=dict)
    train: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def overrides(self) -> dict[str, str]:
        return {**self.model, **self.train, **self.data}


# The CPU scale: the cpu-* family shrunk uniformly (d_model 256 -> 128, FFN 1024 -> 512, so
# experts 8x512 ... 64x64) and trained 300 steps of 16 x 128 tokens, so that `xmoe study all`
# (25 runs) fits in about an hour on 2 shared CPU cores (timed in docs/results.md, "Budget and
# machine"). lr 2e-3 is the `xmoe demo` recipe's, chosen before this study and not tuned on its
# validation numbers; the rest is the paper's recipe
# (AdamW 0.9/0.95, wd 0.1, cosine to 1% with 10% warm-up, clip 1.0, aux 0.01, capacity 8).
CPU = Scale(
    name="cpu",
    family="cpu",
    d_ff=512,
    model={"model.d_model": "128", "model.d_ff": "512", "model.n_head": "4"},
    train={"train.max_steps": "300", "train.batch_size": "16", "train.seq_len": "128", "train.lr": "2e-3",
           "train.eval_every": "0", "train.save_every": "100", "train.log_every": "5", "train.eval_batches": "10"},
    note="cpu-* presets shrunk uniformly to d_model 128, FFN 512; 300 steps x 16 x 128 tokens",
)

# GPT-2 small and the paper's LM recipe: batch 256 x 1024 tokens (32 x 8 accumulation), 60k
# steps, lr 4.5e-4 cosine to 4.5e-6, 10% warm-up. For GPUs; ~323M parameters per MoE model.
GPT2 = Scale(
    name="gpt2",
    family="gpt2",
    d_ff=3072,
    train={"train.max_steps": "60000", "train.batch_size": "32", "train.grad_accum": "8",
           "train.seq_len": "1024", "train.lr": "4.5e-4", "train.min_lr_ratio": "0.01",
           "train.eval_every": "1000", "train.save_every": "1000", "train.log_every": "50",
           "train.eval_batches": "100"},
    data={"data.vocab_size": "50257"},
    note="GPT-2 small family (gpt2-* presets) with the paper's LM recipe",
)

# Seconds on a CPU, for tests and smoke runs: the debug presets, a handful of steps.
DEBUG = Scale(
    name="debug",
    family="debug",
    d_ff=256,
    train={"train.max_steps": "4", "train.batch_size": "4", "train.seq_len": "32", "train.eval_every": "0",
           "train.save_every": "0", "train.log_every": "1", "train.eval_batches": "2"},
    data={"data.vocab_size": "300"},
    note="debug presets, 4 steps (tests only)",
)

SCALES = {s.name: s for s in (CPU, GPT2, DEBUG)}


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One model of the family: dense (router None), top-k (top_k = E/8; E = 8 is Switch) or
    XMoE (router "threshold", at ``threshold``)."""

    router: str | None
    num_experts: int = 0
    threshold: float = MAIN_THRESHOLD

    def __post_init__(self) -> None:
        if self.router not in (None, "topk", "threshold"):
            raise UsageError(f"Variant.router must be None (dense), 'topk' or 'threshold', got {self.router!r}")

    def label(self, d_ff: int) -> str:
        """``dense``, ``switch-8x512``, ``topk-16x256``, ``xmoe-64x64-t0.9``."""
        if self.router is None:
            return "dense"
        shape = f"{self.num_experts}x{8 * d_ff // self.num_experts}"
        if self.router == "threshold":
            return f"xmoe-{shape}-t{self.threshold:g}"
        return f"{'switch' if self.num_experts == 8 else 'topk'}-{shape}"


DENSE = Variant(router=None)
MAIN_VARIANTS = (
    DENSE,
    Variant(router="topk", num_experts=8),
    Variant(router="topk", num_experts=16),
    Variant(router="topk", num_experts=64),
    Variant(router="threshold", num_experts=16),
    Variant(router="threshold", num_experts=32),
    Variant(router="threshold", num_experts=64),
)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run: a preset plus overrides, trained into the folder ``name`` (xmoe.study.runner).
    A study's run is a variant and a seed at a scale; ``label`` names its row in the tables."""

    name: str
    preset: str
    overrides: dict[str, str]
    label: str = ""
    variant: Variant | None = None
    seed: int = 0

    def config(self) -> LMRunConfig:
        return lm_run_config(self.preset, overrides=self.overrides)


@dataclass(frozen=True, kw_only=True)
class StudyPlan:
    """The runs a study needs (each once) and what its tables are made of."""

    name: str
    scale: Scale
    data: str | None
    seeds: tuple[int, ...]  # of the main comparison
    sweep_seeds: tuple[int, ...]  # of the threshold and granularity sweeps
    runs: tuple[RunSpec, ...]
    main: tuple[Variant, ...] = ()
    train_thresholds: tuple[Variant, ...] = ()
    inference_models: tuple[Variant, ...] = ()  # evaluated at INFERENCE_THRESHOLDS
    granularity: tuple[Variant, ...] = ()
    extra_overrides: dict[str, str] = field(default_factory=dict)  # given by the user, on top of the scale's

    def common_overrides(self) -> dict[str, str]:
        """The overrides every run of the plan shares (the scale's and the user's)."""
        first = self.runs[0].overrides
        return {k: v for k, v in first.items() if all(r.overrides.get(k) == v for r in self.runs)}

    def run(self, variant: Variant, seed: int) -> RunSpec:
        name = run_name(variant, seed, self.scale)
        return next(r for r in self.runs if r.name == name)


def run_name(variant: Variant, seed: int, scale: Scale) -> str:
    return f"{variant.label(scale.d_ff)}-s{seed}"


def plan_study(name: str, *, scale: str = "cpu", seeds: int = 3, sweep_seeds: int = 1, steps: int | None = None,
               data: str | None = None, overrides: dict[str, str] | None = None) -> StudyPlan:
    """The runs of study ``name`` (one of STUDIES) at ``scale``; every config is built (and so
    validated) here, before anything trains. ``steps`` replaces the scale's train.max_steps;
    ``overrides`` are extra dotted overrides for every run (applied last)."""
    if name not in STUDIES:
        raise UsageError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    if scale not in SCALES:
        raise UsageError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    check_counts("study", seeds=seeds, sweep_seeds=sweep_seeds)
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise UsageError(f"steps must be a positive integer (optimizer steps per run), got {steps!r}")
    sc = SCALES[scale]
    extra = dict(overrides or {})
    if steps is not None:
        extra["train.max_steps"] = str(steps)
    if data is not None:
        extra["data.path"] = str(data)
    parts = ("main", "threshold", "granularity") if name == "all" else (name,)
    main = MAIN_VARIANTS if "main" in parts else ()
    train_t = tuple(Variant(router="threshold", num_experts=SWEEP_EXPERTS, threshold=t) for t in TRAIN_THRESHOLDS)
    train_t = train_t if "threshold" in parts else ()
    inference = (Variant(router="threshold", num_experts=SWEEP_EXPERTS),) if "threshold" in parts else ()
    gran = tuple(Variant(router="threshold", num_experts=e) for e in GRANULARITY_EXPERTS) if "granularity" in parts else ()
    # The main comparison first, seed by seed, then the sweeps: a study cut short has whole
    # comparisons, and the sweeps (secondary) are what it lacks.
    wanted = [(v, s) for s in range(seeds) for v in main]
    wanted += [(v, s) for s in range(sweep_seeds) for v in train_t + inference + gran]
    runs: dict[str, RunSpec] = {}
    for variant, seed in wanted:
        spec = run_spec(sc, variant, seed, extra)
        runs.setdefault(spec.name, spec)
    for spec in runs.values():
        spec.config()  # a bad override fails now, not an hour in
    return StudyPlan(name=name, scale=sc, data=data, seeds=tuple(range(seeds)), sweep_seeds=tuple(range(sweep_seeds)),
                     runs=tuple(runs.values()), main=main, train_thresholds=train_t, inference_models=inference,
                     granularity=gran, extra_overrides=dict(overrides or {}))


def run_spec(scale: Scale, variant: Variant, seed: int, extra: dict[str, str]) -> RunSpec:
    preset = _preset(scale, variant)
    overrides = {**scale.overrides(), **_variant_overrides(scale, variant, preset), "train.seed": str(seed), **extra}
    return RunSpec(name=run_name(variant, seed, scale), label=variant.label(scale.d_ff), variant=variant, seed=seed,
                   preset=preset, overrides=overrides)


def _preset(scale: Scale, variant: Variant) -> str:
    """The family preset with this router and expert count, else one with this router (the
    expert count is then overridden: e.g. XMoE with 8 experts for the granularity sweep)."""
    names = [n for n in PRESETS if n.startswith(f"{scale.family}-")]

    def kind(name: str) -> tuple[str | None, int]:
        moe = get_preset(name).moe
        return (None, 0) if moe is None else (moe.router, moe.num_experts)

    exact = [n for n in names if kind(n) == (variant.router, variant.num_experts)]
    same_router = [n for n in names if kind(n)[0] == variant.router]
    if not (exact or same_router):
        raise UsageError(f"the {scale.family}-* presets have no {variant.router or 'dense'} model")
    return (exact or same_router)[0]


def _variant_overrides(scale: Scale, variant: Variant, preset: str) -> dict[str, str]:
    """Expert count, width and top-k budget of the parameter-matched family at the scale's width."""
    if variant.router is None:
        return {}
    base = get_preset(preset)
    d_model = int(scale.model.get("model.d_model", base.d_model))
    moe = family_moe(variant.router, variant.num_experts, d_model=d_model, d_ff=scale.d_ff)
    return {"model.moe.num_experts": str(moe.num_experts), "model.moe.expert_dim": str(moe.expert_dim),
            "model.moe.top_k": str(moe.top_k), "model.moe.threshold": f"{variant.threshold:g}"}
