"""Corpora from --data: text files, folders, JSONL, their errors; the split; the fingerprint."""

from __future__ import annotations

import json

import pytest
from helpers.data import english

from xmoe.data import corpus_fingerprint, load_corpus, split_documents


def test_text_file_is_one_document(text_file):
    assert load_corpus(str(text_file)) == [text_file.read_text(encoding="utf-8")]


def test_folder_is_read_recursively_in_sorted_order_with_known_suffixes(tmp_path):
    root = tmp_path / "corpus"
    files = {
        "b.txt": "bee\n",
        "a/z.md": "zed\n",
        "a/y.RST": "why\n",
        "c.jsonl": json.dumps({"text": "line one"}) + "\n" + json.dumps({"text": "two"}) + "\n",
        "skip.bin": "not read\n",
        "noext": "not read\n",
        ".hidden.txt": "not read\n",
        ".git/HEAD.txt": "not read\n",
        "empty.txt": "  \n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    assert load_corpus(str(root)) == ["why\n", "zed\n", "bee\n", "line one", "two"]


def test_jsonl_one_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "first\nwith a newline"}, {"text": "second \u2028 separator", "id": 7}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    assert load_corpus(str(path)) == [r["text"] for r in records]


def test_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello\n".encode())
    assert load_corpus(str(path)) == ["hello\n"]


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(str(missing))


@pytest.mark.parametrize("contents", ["", "   \n\n\t"])
def test_empty_file_names_it(tmp_path, contents):
    path = tmp_path / "empty.txt"
    path.write_text(contents)
    with pytest.raises(ValueError, match="empty.txt.*no text"):
        load_corpus(str(path))


def test_folder_without_text_files_names_it(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="pictures.*no .txt"):
        load_corpus(str(folder))


def test_binary_file_in_folder_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "bad.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(ValueError, match=r"bad\.txt.*binary"):
        load_corpus(str(tmp_path))


def test_undecodable_file_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not UTF-8.*offset 3"):
        load_corpus(str(path))


def test_jsonl_line_without_text_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl.*line 3.*\"text\""):
        load_corpus(str(path))


@pytest.mark.parametrize(
    "line, reason",
    [("{not json", "not valid JSON"), ('{"text": 5}', "not a string"), ('["text"]', '"text"')],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"docs\.jsonl.*line 2.*{reason}"):
        load_corpus(str(path))


def test_split_takes_the_tail_at_a_line_start():
    docs = [english(100, seed=seed) for seed in range(5)]
    train, val = split_documents(docs, 0.3)  # the cut falls inside docs[3]
    assert "".join(train) + "".join(val) == "".join(docs)
    total = sum(map(len, docs))
    assert 0.29 * total < sum(map(len, val)) < 0.31 * total
    assert train[:3] == docs[:3] and val[1:] == docs[4:]
    assert docs[3] == train[3] + val[0]
    assert val[0][0].isupper() and train[-1].endswith("\n")  # the cut is at a line start
    assert split_documents(docs, 0.3) == (train, val)


def test_split_of_a_single_line_document_cuts_inside_it():
    train, val = split_documents(["x" * 100], 0.2)
    assert (train, val) == (["x" * 80], ["x" * 20])


def test_split_of_a_tiny_corpus_names_it():
    with pytest.raises(ValueError, match="'tiny.txt' has 3 characters.*val_fraction"):
        split_documents(["ab\n"], 0.05, source="'tiny.txt'")


def test_fingerprint_sees_content_and_boundaries():
    assert corpus_fingerprint(["ab", "c"]) == corpus_fingerprint(["ab", "c"])
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["ab", "d"])
