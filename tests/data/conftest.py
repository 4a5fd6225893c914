"""Fixtures of the data tests: small corpora written into tmp_path."""

from __future__ import annotations

import pytest
from helpers.data import english


@pytest.fixture
def text_file(tmp_path):
    """A 2,000-line text file (about 120 KB)."""
    path = tmp_path / "corpus.txt"
    path.write_text(english(2000), encoding="utf-8")
    return path
