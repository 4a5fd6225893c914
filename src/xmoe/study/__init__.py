"""xmoe.study: a reproducible small-scale study of XMoE's language-modelling claims (Yang et al.,
2024, arXiv 2403.18926, Sec. 4): the parameter-matched comparison over seeds, the threshold
sweeps (training and inference) and the granularity sweep. `xmoe study NAME` runs one.

    from xmoe.study import plan_study, run_study
    plan = plan_study("all", scale="gpt2")         # the runs and their configs, nothing trained
    results = run_study("main", out="runs/study/x", data="input.txt")
"""

from .aggregate import exceeds_spread, mean_std, pairwise, summarize
from .measure import MEASUREMENTS, inference_sweep, measure_run, training_numbers
from .plan import SCALES, STUDIES, RunSpec, Scale, StudyPlan, Variant, plan_study
from .runner import RESULTS_JSON, RESULTS_MD, Runner, default_out, run_study, write_results

__all__ = [
    "MEASUREMENTS", "RESULTS_JSON", "RESULTS_MD", "Runner", "SCALES", "STUDIES", "RunSpec", "Scale", "StudyPlan", "Variant",
    "default_out", "exceeds_spread", "inference_sweep", "mean_std", "measure_run", "pairwise", "plan_study",
    "run_study", "summarize", "training_numbers", "write_results",
]
