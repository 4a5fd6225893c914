"""`xmoe convert` end to end on a debug checkpoint trained here, its errors, and route 1 (the
split8 preset trained at t = 1, then swept)."""

from __future__ import annotations

import json

import pytest

from helpers.cli import TINY_TRAIN, run_cli
from helpers.data import write_corpus
from xmoe.cli.main import main
from xmoe.tasks.lm import load_lm



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_corpus(root / "corpus.txt", num_lines=400)
    cache = f"--data.cache_dir={root / 'cache'}"
    main(["train", "--preset", "debug-dense", "--out", str(root / "dense"), f"--data.path={root / 'corpus.txt'}",
          *TINY_TRAIN, cache])
    return root


def test_convert_then_eval_and_sweep(runs, capsys):
    out = runs / "x8"
    run_cli(["convert", "--checkpoint", str(runs / "dense"), "--experts", "8", "--out", str(out),
             "--partition", "clustered", "--calibration-tokens", "1024"], capsys)
    dense = json.loads(run_cli(["eval", "--checkpoint", str(runs / "dense"), "--json"], capsys))
    full = json.loads(run_cli(["eval", "--checkpoint", str(out), "--json"], capsys))
    assert full["loss"] == pytest.approx(dense["loss"], abs=1e-5)  # exact at t = 1
    assert full["moe_flops_ratio"] == 1.0
    low = json.loads(run_cli(["eval", "--checkpoint", str(out), "--threshold", "0.5", "--json"], capsys))
    assert low["moe_flops_ratio"] < 1.0 and low["experts_per_token"] < 8
    run_cli(["sweep-threshold", "--checkpoint", str(out), "--thresholds", "0.5", "1.0"], capsys)
    assert (out / "report" / "threshold_sweep.png").is_file()
    saved = json.loads((out / "conversion.json").read_text())
    assert saved["config"]["partition"] == "clustered" and len(saved["layers"]) == 2
    assert load_lm(out).model.cfg.moe_output_bias


def test_bad_inputs_are_clear_errors_and_leave_out_untouched(runs, capsys):
    existing = runs / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["--checkpoint", str(runs / "dense"), "--experts", "7", "--out", str(runs / "new7")], "do not divide"),
        (["--checkpoint", str(runs / "dense"), "--experts", "0", "--out", str(runs / "new7")], "--experts must be at least 1"),
        (["--checkpoint", str(runs / "missing"), "--experts", "8", "--out", str(runs / "new8")], "does not exist"),
        (["--checkpoint", str(runs / "dense"), "--experts", "8", "--out", str(existing)], "already exists"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (runs / "new7").exists() and not (runs / "new8").exists()
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text() == "mine"
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_a_converted_checkpoint_is_not_dense(runs, capsys):
    out = runs / "x4"
    run_cli(["convert", "--checkpoint", str(runs / "dense"), "--experts", "4", "--out", str(out),
             "--calibration-tokens", "256"], capsys)
    with pytest.raises(SystemExit):
        main(["convert", "--checkpoint", str(out), "--experts", "4", "--out", str(runs / "again")])
    assert "not dense" in capsys.readouterr().err and not (runs / "again").exists()


def test_route_1_split_preset_trains_at_t_1_and_sweeps(runs, capsys):
    out = runs / "split"
    run_cli(["train", "--preset", "split8-debug", "--out", str(out), f"--data.path={runs / 'corpus.txt'}", *TINY_TRAIN,
             f"--data.cache_dir={runs / 'cache'}"], capsys)
    model = load_lm(out).model
    assert model.cfg.moe_layer_indices == (0, 1) and model.cfg.moe.threshold == 1.0
    assert model.cfg.moe.combine == "probs" and model.cfg.moe.capacity_factor is None
    table = run_cli(["sweep-threshold", "--checkpoint", str(out), "--thresholds", "0.5", "1.0"], capsys)
    assert "| 1 | 8.00 | 1.000 |" in table  # every expert, the whole dense FFN's FLOPs, at t = 1


def test_a_hugging_face_folder_takes_the_hugging_face_route(tmp_path, capsys):
    """Recognised by its config.json (no transformers needed to say so); it brings no training
    text, so calibration text is required (the route itself: test_conversion_hf_cli.py)."""
    folder = tmp_path / "hf-gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--checkpoint", str(folder), "--experts", "4", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--data FILE" in capsys.readouterr().err and not (tmp_path / "out").exists()
