"""The one threshold sweep (xmoe.sweep): its point, loop, table, plot and files, shared by
`xmoe sweep-threshold` on every kind of model, the demo's dial and converted models. The
measurements themselves are checked where each kind is (tests/conversion, tests/hf, tests/training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from xmoe.sweep import (
    SweepPoint,
    plot_threshold_sweep,
    read_sweeps,
    sweep,
    sweep_record,
    sweep_table,
    threshold_sweep_figure,
    write_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 8_000, f"{path.name} is no PNG, or nearly blank"


SWEEP = [  # given out of order on purpose: the table sorts by threshold
    {"threshold": 0.9, "perplexity": 120.5, "moe_flops_ratio": 0.62, "experts_per_token": 2.48},
    {"threshold": 0.5, "perplexity": 131.25, "moe_flops_ratio": 0.31, "experts_per_token": 1.24},
    {"threshold": 1.0, "perplexity": 119.0, "moe_flops_ratio": 4.0, "experts_per_token": 16.0},
]


def test_plot_threshold_sweep_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "new" / "threshold_sweep.png"
    assert plot_threshold_sweep(SWEEP, path) == path
    _assert_png(path)


def test_sweep_table_has_one_row_per_threshold_in_order() -> None:
    lines = sweep_table(SWEEP).splitlines()
    assert lines[0].startswith("| t |") and set(lines[1]) <= set("|- ")
    body = lines[2:]
    assert [l.split("|")[1].strip() for l in body] == ["0.5", "0.9", "1"]
    assert body[0] == "| 0.5 | 1.24 | 0.310 | 131.25 |"


def test_sweep_table_without_experts_column_and_bad_rows() -> None:
    rows = [{k: v for k, v in r.items() if k != "experts_per_token"} for r in SWEEP]
    lines = sweep_table(rows).splitlines()
    assert "experts" not in lines[0] and len(lines) == 2 + len(rows)
    with pytest.raises(ValueError, match="moe_flops_ratio"):
        sweep_table([{"threshold": 0.9, "perplexity": 120.0}])
    with pytest.raises(ValueError, match="at least one threshold"):
        sweep_table([])


# Moved from tests/conversion/test_conversion_gpt.py (conversion's sweep is this one).

def test_sweep_table_and_plot_take_a_point_at_the_models_own_threshold(tmp_path):
    curves = {"m": [SweepPoint(None, 20.0, 0.5, experts_per_token=2.0, loss=math.log(20.0)),
                    SweepPoint(0.9, 25.0, 0.25, experts_per_token=1.0, loss=math.log(25.0))]}
    table = sweep_table(curves["m"])
    assert "| as loaded | 2.00 | 0.500 | 20.00 |" in table and "| 0.9 | 1.00 | 0.250 | 25.00 |" in table
    assert table.index("as loaded") < table.index("| 0.9 |")
    plot_threshold_sweep(curves, tmp_path / "sweep.png", baseline="dense", dense_perplexity=19.0)
    _assert_png(tmp_path / "sweep.png")


# New: the loop, the point's JSON form, the files.

def test_the_loop_turns_the_dial_before_each_measurement_and_labels_what_it_says():
    turned, dial_at = [], [None]

    def dial(t):
        turned.append(t)
        dial_at[0] = t
        return f"t={t:g}, at most 2" if t < 0.5 else None

    def measure():  # a fake model whose perplexity falls as t rises
        t = dial_at[0]
        return SweepPoint(None, 100.0 - 10 * t, t, experts_per_token=4 * t)

    points = sweep([0.3, 0.9], measure, dial)
    assert turned == [0.3, 0.9]
    assert [(p.threshold, p.perplexity, p.label) for p in points] == [(0.3, 97.0, "t=0.3, at most 2"),
                                                                       (0.9, 91.0, "0.9")]


def test_a_point_survives_its_json_row():
    point = SweepPoint(0.7, 12.5, 0.4, experts_per_token=1.6, loss=math.log(12.5), tokens=512,
                       tokens_per_second=900.0, histogram=(0, 3, 1))
    row = json.loads(json.dumps(point.to_dict()))
    assert SweepPoint.from_dict(row) == point
    assert "routing" not in row  # what was not measured is not written
    assert sweep_record([point], data="'x.txt'", step=None, baseline="top-k")["rows"] == [row]


def test_write_sweep_names_its_files_by_the_text_and_report_reads_them_back(tmp_path, capsys):
    points = [SweepPoint(t, 10.0 / t, t, experts_per_token=2 * t) for t in (0.5, 1.0)]
    write_sweep(points, tmp_path, data=None, step=7, baseline="top-k")
    write_sweep(points[:1], tmp_path, data=tmp_path / "held out.txt", step=7, baseline="top-k")
    printed = capsys.readouterr().out
    assert "| 0.5 | 1.00 | 0.500 | 20.00 |" in printed
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["threshold_sweep.json", "threshold_sweep_held_out.json"]
    sweeps = read_sweeps(tmp_path)
    assert sweeps["threshold_sweep.json"]["data"] == "the validation text"
    assert sweeps["threshold_sweep_held_out.json"]["data"] == repr(str(tmp_path / "held out.txt"))
    assert [SweepPoint.from_dict(r) for r in sweeps["threshold_sweep.json"]["rows"]] == points
    assert (tmp_path / "threshold_sweep.png").is_file()


def test_the_figure_draws_one_line_per_model_and_the_dense_reference():
    curves = {"a": SWEEP, "b": [{"threshold": 0.9, "perplexity": 118.0, "moe_flops_ratio": 0.7}]}
    ax = threshold_sweep_figure(curves, baseline="dense", data="x", dense_perplexity=117.0).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["a", "b"] and "dense model (t = 1): 117.00" in legend
    assert [len(line.get_xdata()) for line in ax.get_lines()[:2]] == [3, 1]
