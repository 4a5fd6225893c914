"""benchmarks/fused_backend.py (the fused backend's run size and bf16 error) runs as a dry run
at a tiny shape. That the fused backend computes the same layer at every run size is
tests/moe/test_backends_vs_oracle.py's job."""

from __future__ import annotations

import runpy
from pathlib import Path

from xmoe.moe.backends import fused

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fused_backend.py"


def test_dry_run_times_each_run_size_and_puts_chunk_bytes_back(capsys) -> None:
    default = fused.CHUNK_BYTES
    times, errors = runpy.run_path(str(SCRIPT))["main"](["--shape", "tiny", "--rows", "8", "64", "--repeats", "1"])
    assert fused.CHUNK_BYTES == default
    assert list(times) == [8, 64] and all(t > 0 for t in times.values())
    assert 0 < errors["loop"] < 2e-2 and 0 < errors["fused"] < 2e-2  # bf16 rounding, not a wrong result
    assert "| 8 | " in capsys.readouterr().out

