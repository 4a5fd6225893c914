"""The layer with backend="triton", held to the same float64 oracle cases as every backend.

Triton's interpreter must be switched on before triton is first imported, and the rest of the
suite imports it earlier, so the oracle cases run in a child pytest with TRITON_INTERPRET=1,
where CPU_BACKENDS includes "triton": every case of test_backends_vs_oracle, dynamic and static.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_backends_vs_oracle import CASES

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install 'xmoe[triton]')")
def test_triton_layer_matches_oracle_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    selection = "(test_layer_matches_oracle or test_static_mode_matches_oracle) and triton and not cuda"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection,
         str(HERE / "test_backends_vs_oracle.py"), str(HERE / "test_static_and_syncs.py")],
        cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))
    assert passed == 2 * len(CASES)  # each case once dynamic, once static
