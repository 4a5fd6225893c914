"""xmoe.report: what a person reads about a run, drawn from its metrics.jsonl
(xmoe.training.metrics): PNG plots (``plots``), summary.md (``summary``), the sentences a
command prints (``console``); threshold sweeps are xmoe.sweep's. The top floor: nothing below
imports it, so the training loop never loads plotting or markdown code.
"""

from .console import describe_eval, describe_mt_eval, flops_baseline, is_dense_split
from .summary import SUMMARY_MD, summary_markdown, write_report

__all__ = ["SUMMARY_MD", "describe_eval", "describe_mt_eval", "flops_baseline", "is_dense_split",
           "summary_markdown", "write_report"]
