"""The built-in corpus: deterministic across processes, non-trivial, read without importing.

Also checks that ``xmoe.data`` imports nothing else from xmoe.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xmoe.data import DEFAULT_MODULES, corpus_fingerprint, default_corpus

FRESH_PROCESS = """
import json, sys
import xmoe.data
before = set(sys.modules)
documents = xmoe.data.default_corpus()
print(json.dumps({
    "fingerprint": xmoe.data.corpus_fingerprint(documents),
    "xmoe": sorted(m for m in sys.modules if m == "xmoe" or m.startswith("xmoe.")),
    "new": sorted(set(sys.modules) - before),
    "not_loaded_before": sorted(set(xmoe.data.DEFAULT_MODULES) - before),
}))
"""


@pytest.fixture(scope="module")
def documents():
    return default_corpus()


@pytest.fixture(scope="module")
def fresh_process():
    """What a new interpreter (another hash seed) sees when it builds the default corpus."""
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_default_modules_are_sorted_and_unique():
    assert list(DEFAULT_MODULES) == sorted(set(DEFAULT_MODULES))
    assert "antigravity" not in DEFAULT_MODULES and "this" not in DEFAULT_MODULES


def test_default_corpus_is_nontrivial_and_has_both_sources(documents):
    from pydoc_data.topics import topics

    assert sum(len(doc) for doc in documents) > 1_000_000  # ~1.5 MB on Python 3.11
    assert len(documents) > 150
    assert topics["assert"] in documents  # reference topics, verbatim
    json_doc = next(doc for doc in documents if doc.startswith("Module json.decoder\n"))
    assert "class JSONDecoder(object)" in json_doc  # docstrings parsed from the source


def test_default_corpus_is_the_same_in_a_fresh_process(documents, fresh_process):
    assert corpus_fingerprint(documents) == fresh_process["fingerprint"]


def test_data_imports_nothing_else_from_xmoe(fresh_process):
    modules = fresh_process["xmoe"]
    assert "xmoe.data" in modules
    assert all(m in ("xmoe", "xmoe.extras", "xmoe.errors") or m.startswith("xmoe.data") for m in modules), modules


def test_default_corpus_parses_modules_without_importing_them(fresh_process):
    assert len(fresh_process["not_loaded_before"]) > 20  # so importing them would show
    new = {m for m in fresh_process["new"] if not m.startswith("_sysconfigdata")}
    assert new <= {"pydoc_data", "pydoc_data.topics"}, fresh_process["new"]
