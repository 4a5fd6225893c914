"""Small formatting helpers the summary and the sweep table share."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
