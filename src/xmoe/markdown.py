"""Markdown table cells and rows, for every table a person reads: a run's summary.md, threshold
sweeps, lm-eval points. Imports nothing, so every floor may use it."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" for a value that was not measured (None)."""
    return format(value, spec) if value is not None else "-"


def finite(value: Any) -> bool:
    """A number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a table: ``header``, its separator, then one line per row of cells."""
    return [md_row(header), md_row(["---"] * len(header)), *(md_row(cells) for cells in rows)]
