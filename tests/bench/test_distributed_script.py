"""benchmarks/distributed.py: its configurations parse (or say how to write them), and a tiny run
reports FSDP holding half of what one process holds, per rank, on 2 ranks."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT))


def test_configurations_parse_and_a_wrong_one_says_how_to_write_it(script) -> None:
    parse = script["parse_config"]
    assert (parse("dp2xep2:fsdp").dp, parse("dp2xep2:fsdp").ep, parse("dp2xep2:fsdp").impl) == (2, 2, "fsdp")
    assert (parse("ep4:allreduce").dp, parse("ep4:allreduce").ep) == (1, 4)
    assert parse("1").world == 1
    with pytest.raises(ValueError, match="dpD\\[xepE\\]:fsdp\\|allreduce"):
        parse("dp2")


@pytest.mark.slow
def test_a_tiny_run_reports_fsdp_holding_half_per_rank(tmp_path) -> None:
    """In a process of its own: the ranks it spawns import the script by path."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--preset", "debug-xmoe", "--configs", "1", "dp2:fsdp",
                             "--batch", "2", "--seq-len", "8", "--steps", "1", "--warmup", "0", "--threads", "2",
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| dp2:fsdp |" in result.stdout
    one, fsdp = json.loads(out.read_text())["rows"]
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert fsdp[key] == pytest.approx(one[key] / 2, rel=0.01), key  # shards of dim 0, padded by at most a row
