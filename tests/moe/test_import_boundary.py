"""xmoe.moe is the core: it depends on torch only, and nothing above it (the house style,
"Imports point one way"). Checked in a fresh interpreter, so other tests' imports don't count."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, sys, warnings
import torch                      # whatever torch pulls in (numpy, maybe) is torch's business
before = set(sys.modules)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from xmoe.moe import *        # every export: they are imported on first use (xmoe.lazy)
new = sorted(set(sys.modules) - before)
print(json.dumps({"new": new, "warnings": [str(w.message) for w in caught], "all": sorted(sys.modules)}))
"""

UPPER_LAYERS = ("models", "training", "cli", "data", "conversion", "distributed", "bench")


def _probe() -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_imports_nothing_above_it_and_no_third_party() -> None:
    probe = _probe()
    assert "xmoe.moe" in probe["all"]
    upper = [m for m in probe["all"] if m.split(".")[0] == "xmoe" and m.split(".")[1:2] and m.split(".")[1] in UPPER_LAYERS]
    assert upper == [], f"xmoe.moe imported {upper}"
    allowed = set(sys.stdlib_module_names) | {"xmoe", "torch"}
    third_party = sorted({m.split(".")[0] for m in probe["new"]} - allowed)
    assert third_party == [], f"xmoe.moe imported third-party modules {third_party}"
    assert probe["warnings"] == [], "importing xmoe.moe must not warn"
