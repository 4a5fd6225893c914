"""benchmarks/gpu.py, the one-command GPU check, runs here as a dry run (--device cpu --quick),
so that it is ready, and right, the day a GPU is available; and it must bring numbers back
whatever goes wrong: a section that fails, a child process that crashes, a device left unusable,
a section that hangs, the command's timeout."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("xmoe_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _dry_run(out: Path, *args: str) -> tuple[int, dict, str]:
    torch._dynamo.reset()
    code = _load().main(["--device", "cpu", "--quick", "--out", str(out), *args])
    return code, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_dry_run_writes_every_section(tmp_path) -> None:
    code, saved, md = _dry_run(tmp_path)
    gpu = _load()
    assert code == 0 and saved["ok"] and saved["finished"]
    assert saved["machine"]["device"].startswith("cpu")
    sections = saved["sections"]
    assert list(sections) == [s.name for s in gpu.SECTIONS]  # in order of value, each recorded
    assert all(r["status"] == "ok" for r in sections.values()), {n: r["status"] for n, r in sections.items()}

    variants = {r["variant"] for r in sections["correctness"]["rows"]}
    assert variants == {"loop", "grouped_mm", "fused", "static"}
    for row in sections["correctness"]["rows"]:
        assert row["ok"] and row["routing_equals_cpu"] and row["idle_expert"], row
    # Triton ran in its child process, in Triton's interpreter (or said why it could not).
    assert (tmp_path / "child-triton-correctness" / "results.json").exists()
    for row in sections["triton-correctness"]["rows"]:
        assert row["ok"] or (row["ok"] is None and "Triton" in row["skipped"]), row

    for name in ("layer-S1", "layer-paper", "layer-small", "layer-large"):
        rows = sections[name]["rows"]
        assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"] and "xmoe[static]" in rows[0]["ms"]
        assert rows[0]["static_rows"] > rows[0]["kept_pairs"]  # static mode pads, and says so
    assert "Static mode pads to E x C" in md

    graphs = sections["graphs"]["rows"]
    assert [r["tokens"] for r in graphs] == [*gpu.DECODE_TOKENS, 256, 256]
    assert [r["pass"] for r in graphs][-2:] == ["fwd (eval)", "fwd+bwd (train)"]
    for row in graphs:  # everything but the capture ran; the capture says why not
        assert row["ms"]["eager static"] > 0 and row["ok"] is None and "CUDA device" in row["graph"]

    decode = sections["decode"]["rows"]
    routers = [name for name, *_ in gpu.decode_bench.ROUTERS]
    assert [(r["tokens"], r["layer"]) for r in decode] == [(t, name) for t in gpu.DECODE_TOKENS[:3] for name in routers]
    for row in decode:  # eager and eager static timed next to the dense FFN; the capture says why not
        assert row["ms"]["eager"] > 0 and row["ms"]["eager static"] > 0 and row["dense_ms"]["eager"] > 0
        assert row["ok"] is None and "CUDA device" in row["graph"]
        assert row["static_rows"] >= row["experts_per_token"] * row["tokens"]

    for name in ("compile-S1", "compile-paper"):  # each shape its own graphs, compiled afresh
        fwd, fwd_bwd = sections[name]["rows"]
        assert fwd["first_call_s"] > 0 and fwd_bwd["ms"]["compiled"] > 0
        assert fwd_bwd["graphs"] in (None, 2)
    assert [r["model"] for r in sections["training"]["rows"]] == ["debug-dense", "debug-topk", "debug-xmoe"]
    assert "## 4. correctness against float64 [correctness]" in md and "every check passed" in md


def test_injected_faults_leave_every_other_section(tmp_path) -> None:
    """A failing section records its error and its first row; the sections after it still run;
    one that leaves the device unusable hands the rest to a fresh process; exit status 1."""
    code, saved, md = _dry_run(tmp_path, "--sections", "correctness", "syncs", "graphs", "training",
                               "--inject-fault", "syncs", "--inject-fault", "graphs:poison")
    sections = saved["sections"]
    assert code == 1 and not saved["ok"] and saved["finished"]
    assert sections["correctness"]["status"] == "ok" and len(sections["correctness"]["rows"]) == 8
    for name in ("syncs", "graphs"):
        assert sections[name]["status"] == "failed" and len(sections[name]["rows"]) == 1
        assert "injected fault" in sections[name]["error"]
    assert sections["training"]["status"] == "ok" and len(sections["training"]["rows"]) == 3
    assert (tmp_path / "child-training" / "results.json").exists()  # run in a fresh process
    assert "InjectedPoison" in md and "| debug-xmoe |" in md and "| loop | fp32 |" in md


def test_a_crashing_triton_child_takes_nothing_else_down(tmp_path) -> None:
    code, saved, md = _dry_run(tmp_path, "--sections", "triton-correctness", "triton-syncs", "correctness",
                               "--inject-fault", "triton-correctness:crash")
    sections = saved["sections"]
    assert code == 1
    assert sections["triton-correctness"]["status"] == "crashed"
    assert len(sections["triton-correctness"]["rows"]) == 1  # what it had before it died
    assert "SIGABRT" in sections["triton-correctness"]["error"]
    assert sections["triton-syncs"]["status"] == "not run"
    assert sections["correctness"]["status"] == "ok" and len(sections["correctness"]["rows"]) == 8


def test_sigterm_keeps_every_finished_row(tmp_path) -> None:
    """What `timeout` does to the device command: SIGTERM mid-section. Every row written so far
    stays in results.json and results.md; the section is marked killed; exit status 143."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path),
           "--sections", "correctness", "syncs", "training", "--inject-fault", "syncs:hang"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _status(tmp_path, "syncs") != "running" or not _rows(tmp_path, "syncs"):
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143
    finally:
        if child.poll() is None:
            child.kill()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["killed"] and not saved["ok"] and not saved["finished"]
    assert saved["sections"]["correctness"]["status"] == "ok" and len(saved["sections"]["correctness"]["rows"]) == 8
    assert saved["sections"]["syncs"]["status"] == "killed" and len(saved["sections"]["syncs"]["rows"]) == 1
    md = (tmp_path / "results.md").read_text()
    assert "| grouped_mm | bf16 |" in md and "KILLED" in md and "not started: training" in md


def _status(out: Path, name: str) -> str | None:
    try:
        return json.loads((out / "results.json").read_text())["sections"].get(name, {}).get("status")
    except (OSError, ValueError):
        return None


def _rows(out: Path, name: str) -> list:
    return json.loads((out / "results.json").read_text())["sections"][name]["rows"]


# --- the runner on stand-in sections: every position, every way to end -----------------------------


def _fake_sections(gpu, fail: str | None, how: str = "error") -> list:
    def measure(name):
        def rows(ctx):
            yield {"section": name, "i": 0}
            if name == fail:
                if how == "hang":
                    while True:
                        time.sleep(0.05)
                raise RuntimeError(f"{name} broke")
            yield {"section": name, "i": 1}

        return rows

    render = lambda rows: gpu.table(["section", "i"], [[r["section"], r["i"]] for r in rows])
    return [gpu.Section(n, f"title {n}", 1, measure(n), render, checks=n == "a") for n in "abcd"]


@pytest.mark.parametrize("fail", list("abcd"))
def test_a_fault_in_any_section_leaves_the_others(tmp_path, fail) -> None:
    gpu = _load()
    sections = _fake_sections(gpu, fail)
    report = gpu.Report(tmp_path, {"machine": {"device": "test"}}, {s.name: s for s in sections})
    gpu.run_sections(sections, gpu.Context(torch.device("cpu"), quick=True), report, gpu.Budget(60), in_child=True)
    report.finish()
    saved = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    for name, record in saved["sections"].items():
        assert record["status"] == ("failed" if name == fail else "ok")
        assert len(record["rows"]) == (1 if name == fail else 2)
        assert f"| {name} | 0 |" in md
    assert f"RuntimeError: {fail} broke" in md and not saved["ok"]


def test_a_hanging_section_stops_at_the_budget_and_the_rest_is_skipped(tmp_path) -> None:
    gpu = _load()
    sections = _fake_sections(gpu, "b", how="hang")
    report = gpu.Report(tmp_path, {}, {s.name: s for s in sections})
    start = time.monotonic()
    gpu.run_sections(sections, gpu.Context(torch.device("cpu"), quick=True), report, gpu.Budget(1.0), in_child=True)
    assert time.monotonic() - start < 10
    status = {n: r["status"] for n, r in report.records.items()}
    assert status == {"a": "ok", "b": "timeout", "c": "skipped", "d": "skipped"}
    assert report.records["b"]["rows"] == [{"section": "b", "i": 0}]
    assert "not enough budget" in report.records["c"]["error"]


def test_a_failed_check_row_fails_the_run(tmp_path) -> None:
    gpu = _load()
    sections = _fake_sections(gpu, None)
    report = gpu.Report(tmp_path, {}, {s.name: s for s in sections})
    report.start(sections[0])
    report.add("a", {"section": "a", "i": 0, "ok": False})
    report.end("a", "ok", 0.1)
    assert not report.data["ok"] and "NOT OK" in (tmp_path / "results.md").read_text()


def test_a_failed_capture_is_a_failed_check_not_a_failed_section() -> None:
    """On a GPU static mode must capture; a capture that raises is recorded in its row (ok False)
    and the other sizes still run. Off CUDA nothing is captured and nothing is judged."""
    gpu = _load()

    def broken_capture():
        raise RuntimeError("operation not permitted when stream is capturing")

    on_gpu = gpu.Context(torch.device("cuda"), quick=True)  # a device name only: nothing runs on it
    replay, got, status = gpu.captured(broken_capture, on_gpu)
    assert replay is None and got is None and status.startswith("capture failed: RuntimeError")
    assert gpu.graph_verdict({"eager static": 1.0}, got, [], status, on_gpu)["ok"] is False
    on_cpu = gpu.Context(torch.device("cpu"), quick=True)
    replay, got, status = gpu.captured(broken_capture, on_cpu)
    assert "need a CUDA device" in status and gpu.graph_verdict({}, got, [], status, on_cpu)["ok"] is None


# --- the documented command -------------------------------------------------------------------------


def test_the_readme_has_the_device_command_and_the_plan() -> None:
    """benchmarks/README.md gives the one device command with the script's default budget, and
    the predicted H100 time of every section as `gpu.py --plan` prints it; the predictions fit
    the budget with a margin."""
    gpu = _load()
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    command = re.search(r"timeout -k 10 (\d+) python benchmarks/gpu.py --out \$OUT --budget-s (\d+)", readme)
    assert command, "the device command is missing from benchmarks/README.md"
    timeout_s, budget_s = map(int, command.groups())
    assert budget_s == gpu.DEFAULT_BUDGET_S and budget_s + 60 <= timeout_s <= 570
    for line in gpu.plan().splitlines():
        assert line in readme, f"benchmarks/README.md lacks the plan line {line!r}: paste `gpu.py --plan`"
    assert sum(s.h100_s for s in gpu.SECTIONS) <= 0.75 * budget_s


def test_the_reference_catches_a_wrong_backend(monkeypatch) -> None:
    """The correctness section must be able to fail: a backend that drops the output bias."""
    gpu = _load()
    from xmoe.moe.backends import loop

    real = loop._linear
    monkeypatch.setattr(loop, "_linear", lambda x, w, b: real(x, w, None if b is not None and b.shape[-1] == 64 else b))
    result = gpu.check_layer(torch.device("cpu"), dict(backend="loop"), "fp32")
    assert not result["ok"] and result["errors"]["output"] > 1e-3
