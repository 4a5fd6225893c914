"""The run report (xmoe.report): PNGs and summary.md from a synthetic metrics.jsonl, and
the errors a user sees (the threshold sweep's plot and table: tests/test_sweep.py). Rows are shaped like the ones
``xmoe.training.loop`` and ``lm.evaluate_lm`` write; no model is trained here."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from xmoe.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MOE_PNGS = {"loss.png", "experts_per_token.png", "tokens_per_expert.png", "top1_probability.png",
            "experts_per_token_over_training.png"}


# --- synthetic runs -------------------------------------------------------------------------------


def _layer(experts_per_token: float, histogram: list[int], tokens_per_expert: list[int], dropped: int) -> dict:
    return {"experts_per_token": experts_per_token, "wanted_per_token": experts_per_token + 0.05,
            "dropped_pairs": dropped, "experts_histogram": histogram, "tokens_per_expert": tokens_per_expert,
            "top1_quartiles": [0.41, 0.55, 0.72]}


def _train_row(step: int, loss: float, moe: bool) -> dict:
    row = {"step": step, "split": "train", "lr": 1e-3, "grad_norm": 0.9, "tokens_per_s": 5000.0,
           "loss": loss + 0.01, "ce": loss, "aux_loss": 1.02}
    if moe:
        row.update(experts_per_token=2.0 - step / 100, dropped_token_fraction=0.1)
    return row


def _val_row(step: int, loss: float, perplexity: float, layers: list[dict] | None) -> dict:
    row = {"step": step, "split": "val", "loss": loss, "perplexity": perplexity, "tokens": 1024}
    if layers is not None:
        mean = sum(l["experts_per_token"] for l in layers) / len(layers)
        row.update(experts_per_token=mean, moe_flops_per_token=mean * 2 * 4096.0,
                   topk_moe_flops_per_token=2 * 2 * 4096, moe_flops_ratio=mean / 2, layers=layers)
    return row


def moe_rows() -> list[dict]:
    """Two MoE layers of four experts, 1024 validation tokens; the last evaluation is at step 20.

    Layer 1: 1.75 experts/token (histogram 0/1/2/3/4 experts: 0, 384, 512, 128, 0 tokens).
    Layer 2: 2.25 experts/token, expert 3 idle, 7 dropped pairs.
    """
    early = [_layer(3.00, [0, 0, 0, 1024, 0], [800, 800, 800, 672], 0)] * 2
    final = [_layer(1.75, [0, 384, 512, 128, 0], [700, 600, 400, 92], 0),
             _layer(2.25, [0, 128, 512, 384, 0], [1024, 900, 380, 0], 7)]
    return [_train_row(1, 6.2, True), _train_row(10, 5.0, True), _val_row(10, 5.1, 164.02, early),
            _train_row(20, 4.6, True), _val_row(20, 4.815, 123.456, final)]


def dense_rows() -> list[dict]:
    return [_train_row(1, 6.2, False), _train_row(10, 5.0, False), _val_row(10, 5.3, 200.34, None)]


def _write_run(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the magic
    assert width >= 300 and height >= 250, f"{path.name} is only {width}x{height}"
    assert len(data) > 8_000, f"{path.name} is {len(data)} bytes: nearly blank"


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> dict:
    """One MoE report shared by the tests that read it, with pyplot's open figures before and after."""
    import matplotlib.pyplot as plt  # a dependency of xmoe; imported here, never by the report itself
    run_dir = _write_run(tmp_path_factory.mktemp("moe") / "run", moe_rows())
    before = plt.get_fignums()
    out = write_report(run_dir)
    return {"out": out, "figures_before": before, "figures_after": plt.get_fignums()}


@pytest.fixture(scope="module")
def moe_report(moe_run: dict) -> Path:
    return moe_run["out"]


# --- MoE run --------------------------------------------------------------------------------------


def test_moe_report_goes_to_run_dir_report_with_every_plot(moe_report: Path) -> None:
    assert moe_report == moe_report.parent.parent / "run" / "report"
    assert {p.name for p in moe_report.glob("*.png")} == MOE_PNGS
    for name in sorted(MOE_PNGS):
        _assert_png(moe_report / name)


def test_moe_summary_has_final_numbers_per_layer_routing_and_links(moe_report: Path) -> None:
    text = (moe_report / "summary.md").read_text()
    assert "123.46" in text and "164.02" not in text  # the last evaluation's perplexity, not the first
    layer_lines = {n: [l for l in text.splitlines() if f"| MoE layer {n} |" in l] for n in (1, 2)}
    assert len(layer_lines[1]) == 1 and "| 1.75 |" in layer_lines[1][0]
    assert len(layer_lines[2]) == 1 and "| 2.25 |" in layer_lines[2][0] and "| 7 |" in layer_lines[2][0]
    assert "1 of 4" in layer_lines[2][0]  # expert 3 of layer 2 got no tokens
    assert "mean over MoE layers: 2.00" in text
    assert "1.00x the top-k model" in text  # moe_flops_ratio = 2.00 / 2
    assert "Dropped (token, expert) pairs, all layers: 7" in text
    for name in MOE_PNGS:
        assert f"]({name})" in text


def test_report_leaves_no_figures_open_in_pyplot(moe_run: dict) -> None:
    assert moe_run["figures_after"] == moe_run["figures_before"], "the report left figures open in pyplot"


def test_report_uses_an_explicit_out_dir(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", dense_rows())
    out = write_report(run_dir, tmp_path / "elsewhere" / "deeper")
    assert out == tmp_path / "elsewhere" / "deeper"
    assert {p.name for p in out.iterdir()} == {"loss.png", "summary.md"}
    assert not (run_dir / "report").exists()


def test_moe_run_without_evaluation_still_reports_training(tmp_path: Path) -> None:
    rows = [r for r in moe_rows() if r["split"] == "train"]
    out = write_report(_write_run(tmp_path / "run", rows))
    assert {p.name for p in out.glob("*.png")} == {"loss.png", "experts_per_token_over_training.png"}
    text = (out / "summary.md").read_text()
    assert "No validation rows" in text and "20 steps logged" in text


# --- dense run ------------------------------------------------------------------------------------


def test_dense_report_has_only_loss_plot_and_summary(tmp_path: Path) -> None:
    out = write_report(_write_run(tmp_path / "run", dense_rows()))
    assert {p.name for p in out.iterdir()} == {"loss.png", "summary.md"}
    _assert_png(out / "loss.png")
    text = (out / "summary.md").read_text()
    assert "200.34" in text and "MoE layer" not in text and "experts" not in text.lower()


# --- errors ---------------------------------------------------------------------------------------


def test_missing_metrics_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl") as info:
        write_report(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in str(info.value)


def test_empty_metrics_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no rows") as info:
        write_report(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(info.value)
    assert not (tmp_path / "report").exists()


def test_cut_short_metrics_line_names_the_line(tmp_path: Path) -> None:
    rows = moe_rows()
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:30] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not JSON"):
        write_report(tmp_path)


# --- threshold sweep ------------------------------------------------------------------------------

# --- import hygiene -------------------------------------------------------------------------------


def _modules_after(statement: str) -> set[str]:
    probe = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_report_does_not_import_matplotlib() -> None:
    modules = _modules_after("import xmoe.report")
    assert "xmoe.report.plots" in modules
    assert "matplotlib" not in modules, "matplotlib must be imported inside the plotting functions"


def test_the_training_loop_imports_no_report_code() -> None:
    """The loop depends on the metrics log only: plots, markdown and console text are the report's."""
    modules = _modules_after("import xmoe.training, xmoe.training.loop")
    assert "xmoe.training.metrics" in modules
    assert sorted(m for m in modules if m == "xmoe.report" or m.startswith(("xmoe.report.", "matplotlib"))) == []


@pytest.mark.parametrize("last_train, noted", [({"experts_per_token": 8.0, "wanted_experts_per_token": 14.1}, True),
                                               ({"experts_per_token": 2.0, "wanted_experts_per_token": 2.0}, False),
                                               (None, False)])
def test_the_evaluation_after_training_says_why_it_counts_more_experts_than_the_bar(last_train, noted) -> None:
    """Training's progress bar counts the pairs its capacity kept; where it dropped some, the
    evaluation that follows (dropless) counts more, and says why; where it dropped none (a
    budget's t set on training batches, say), it does not blame capacity."""
    from xmoe.moe import MoEConfig
    from xmoe.report import describe_eval

    moe = MoEConfig(model_dim=8, num_experts=16, expert_dim=4, capacity_factor=8.0)
    layer = {"experts_per_token": 14.2, "top1_quartiles": [0.05, 0.08, 0.1], "tokens_per_expert": [1] * 16}
    summary = {"loss": 5.0, "perplexity": 148.4, "tokens": 384, "experts_per_token": 14.2, "layers": [layer],
               "moe_flops_per_token": 4.7e5, "moe_flops_ratio": 7.1}
    text = describe_eval(summary, moe, last_train=last_train)
    assert ("evaluated dropless, where training's capacity dropped pairs (14.10 wanted, 8.00 kept" in text) == noted
    assert "experts per token: 14.20 on average (per MoE layer: 14.20)" in text
