"""benchmarks/fused_backend.py (the fused backend's run size and bf16 error) runs as a dry run
at a tiny shape. That the fused backend computes the same layer at every run size is
tests/moe/test_backends_vs_oracle.py's job."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from xmoe.moe.backends import fused

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fused_backend.py"


def _load():
    spec = importlib.util.spec_from_file_location("xmoe_fused_backend_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_times_each_run_size_and_puts_chunk_bytes_back(capsys) -> None:
    default = fused.CHUNK_BYTES
    times, errors = _load().main(["--shape", "tiny", "--rows", "8", "64", "--repeats", "1"])
    assert fused.CHUNK_BYTES == default
    assert list(times) == [8, 64] and all(t > 0 for t in times.values())
    assert 0 < errors["loop"] < 2e-2 and 0 < errors["fused"] < 2e-2  # bf16 rounding, not a wrong result
    assert "| 8 | " in capsys.readouterr().out

