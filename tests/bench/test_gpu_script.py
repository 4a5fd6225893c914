"""benchmarks/gpu.py, the one-command GPU check, runs here as a dry run (--device cpu --quick),
so that it is ready, and right, the day a GPU is available."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("xmoe_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_section(tmp_path) -> None:
    torch._dynamo.reset()
    results = _load().main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["device"].startswith("cpu")
    variants = {r["variant"] for r in saved["correctness"]}
    assert {"loop", "fused", "grouped_mm", "static"} <= variants
    for row in saved["correctness"]:
        assert row["ok"] and row["routing_equals_cpu"] and row["idle_expert"], row
    assert [r["pass"] for r in saved["layer"]] == ["fwd", "fwd+bwd"]
    assert "xmoe[static, compiled]" in saved["layer"][0]["ms"]
    assert [r["model"] for r in saved["training"]] == ["debug-dense", "debug-topk", "debug-xmoe"]
    assert all(r["tokens_per_s"] > 0 for r in saved["training"])
    assert "## 3. bf16 layer times" in (tmp_path / "results.md").read_text()
    assert results["quick"] is True and results["ok"] is True


def test_the_reference_catches_a_wrong_backend(monkeypatch) -> None:
    """The correctness section must be able to fail: a backend that drops the output bias."""
    gpu = _load()
    from xmoe.moe.backends import loop

    real = loop._linear
    monkeypatch.setattr(loop, "_linear", lambda x, w, b: real(x, w, None if b is not None and b.shape[-1] == 64 else b))
    result = gpu.check_layer(torch.device("cpu"), dict(backend="loop"), "fp32")
    assert not result["ok"] and result["errors"]["output"] > 1e-3
