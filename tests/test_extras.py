"""The lean install (xmoe.extras): the core imports no optional dependency, and a missing one
fails where it is used with the pip extra that brings it.

A missing module is simulated with ``sys.modules[name] = None`` (what the import system reads as
"not installed"), so each test here fails if its import becomes eager again: an import at module
level would already have bound the real module before the test hides it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from xmoe.extras import EXTRAS, MissingExtra, check_extra, needs_extra

OPTIONAL = ("matplotlib", "sacrebleu", "sentencepiece")
ROOT = Path(__file__).resolve().parents[1]


def hide(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``name`` (and its already imported submodules) look not installed for this test."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")] + [name]:
        monkeypatch.setitem(sys.modules, module, None)


def install_hint(extra: str) -> str:
    return re.escape(f"pip install 'xmoe[{extra}]'")


# --- what the core imports ------------------------------------------------------------------------

PROBE = r"""
import json, sys
optional = %r
seen = {}
for name in ("xmoe", "xmoe.moe", "xmoe.models", "xmoe.data", "xmoe.training", "xmoe.conversion", "xmoe.study",
             "xmoe.cli.main"):
    __import__(name)
    seen[name] = sorted(m for m in optional if m in sys.modules)
print(json.dumps(seen))
"""


def test_importing_the_packages_imports_no_optional_dependency() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE % (OPTIONAL,)], capture_output=True, text=True,
                            timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {name: [] for name in seen}, f"imported eagerly: {seen}"


def test_each_extra_in_pyproject_brings_the_modules_named_for_it_and_dev_brings_them_all() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    distribution = re.compile(r"[A-Za-z0-9_.-]+")
    for extra, modules in EXTRAS.items():
        distributions = {distribution.match(req).group().replace("-", "_") for req in extras[extra]}
        assert set(modules) <= distributions, extra
    assert not {distribution.match(req).group() for req in core} & set(OPTIONAL)
    dev = next(req for req in extras["dev"] if req.startswith("xmoe["))
    assert set(dev[len("xmoe["):-1].split(",")) == set(EXTRAS)


# --- the error and where it is raised -------------------------------------------------------------


def test_needs_extra_names_the_extra_and_lets_other_import_errors_through(monkeypatch) -> None:
    hide(monkeypatch, "sacrebleu")
    with pytest.raises(MissingExtra, match=r"^sacrebleu is not installed \(scores\): " + install_hint("mt") + "$"):
        with needs_extra("mt", "scores"):
            import sacrebleu  # noqa: F401
    with pytest.raises(ModuleNotFoundError) as caught:  # a module of no extra: not ours to explain
        with needs_extra("mt", "scores"):
            import xmoe_no_such_module  # noqa: F401
    assert not isinstance(caught.value, MissingExtra)
    with pytest.raises(MissingExtra, match=install_hint("mt")):
        check_extra("mt", "translation")


def test_the_translation_vocabulary_names_the_mt_extra(monkeypatch, tmp_path) -> None:
    from xmoe.data.translation import SubwordVocab, train_subword_vocab

    hide(monkeypatch, "sentencepiece")
    with pytest.raises(MissingExtra, match=r"sentencepiece is not installed .*" + install_hint("mt")):
        train_subword_vocab(["a small text"] * 20, tmp_path / "vocab", 50)
    assert not (tmp_path / "vocab").exists()  # it stopped before training anything
    with pytest.raises(MissingExtra, match=install_hint("mt")):
        SubwordVocab(tmp_path / "spm.model")


def test_bleu_names_the_mt_extra(monkeypatch) -> None:
    from xmoe.tasks.mt import corpus_scores

    hide(monkeypatch, "sacrebleu")
    with pytest.raises(MissingExtra, match=r"sacrebleu is not installed \(BLEU and chrF\+\+\): " + install_hint("mt")):
        corpus_scores(["a cat"], ["a cat"])


def test_translation_training_stops_before_it_makes_the_run_folder(monkeypatch, tmp_path, capsys) -> None:
    """sacrebleu is needed at the first validation only; train-mt says so before anything else,
    in one line."""
    from xmoe.cli.main import main

    hide(monkeypatch, "sacrebleu")
    files = {}
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        files[name] = tmp_path / name
        files[name].write_text("a small sentence\n" * 8)
    with pytest.raises(SystemExit) as exit_:
        main(["train-mt", "--preset", "debug-xmoe-16x64", f"--data.src={files['train.en']}",
              f"--data.tgt={files['train.de']}", f"--data.valid_src={files['valid.en']}",
              f"--data.valid_tgt={files['valid.de']}", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: sacrebleu is not installed" in err and "pip install 'xmoe[mt]'" in err
    assert not (tmp_path / "run").exists()


def test_plots_name_the_report_extra(monkeypatch, tmp_path) -> None:
    from xmoe.sweep import SweepPoint, plot_threshold_sweep

    hide(monkeypatch, "matplotlib")
    rows = [{"threshold": 0.5, "perplexity": 10.0, "moe_flops_ratio": 0.5}]
    with pytest.raises(MissingExtra, match=r"matplotlib is not installed .*" + install_hint("report")):
        plot_threshold_sweep(rows, tmp_path / "sweep.png")
    point = SweepPoint(threshold=0.5, perplexity=10.0, moe_flops_ratio=0.5, experts_per_token=2.0)
    with pytest.raises(MissingExtra, match=install_hint("report")):
        plot_threshold_sweep({"a": [point]}, tmp_path / "conversion.png")
    assert list(tmp_path.iterdir()) == []


def test_the_study_stops_before_training_without_its_extra(monkeypatch, tmp_path) -> None:
    from xmoe.study import plan_study, run_study

    hide(monkeypatch, "matplotlib")
    assert plan_study("main", scale="debug").runs  # planning draws nothing: no extra needed
    with pytest.raises(MissingExtra, match=r"the study's plots.*" + install_hint("study")):
        run_study("main", out=tmp_path / "study", scale="debug", seeds=1, log=lambda line: None)
    assert not (tmp_path / "study").exists()


def test_a_language_model_trains_reports_and_sweeps_without_matplotlib(monkeypatch, tmp_path, capsys) -> None:
    """The core path (and so `xmoe demo`) needs no extra: without matplotlib the report is
    summary.md alone and each command says, in one warning line, which extra draws the plots."""
    from xmoe.cli.main import main

    hide(monkeypatch, "matplotlib")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog while experts route tokens\n" * 200)
    run = tmp_path / "run"
    main(["train", "--preset", "debug-xmoe", f"--data.path={corpus}", "--out", str(run), "--train.max_steps=2",
          "--train.batch_size=4", "--train.seq_len=32", "--train.eval_every=0", "--train.save_every=0",
          "--train.eval_batches=1", "--data.vocab_size=300", f"--data.cache_dir={tmp_path / 'cache'}", "--threads=1"])
    main(["sweep-threshold", "--checkpoint", str(run), "--thresholds", "0.5", "1.0", "--max-batches", "1"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2, warnings
    assert all("matplotlib is not installed" in w and "pip install 'xmoe[report]'" in w for w in warnings)
    report = run / "report"
    assert "Not drawn: matplotlib is not installed" in (report / "summary.md").read_text()
    assert (report / "threshold_sweep.json").is_file()
    assert not list(report.glob("*.png"))
