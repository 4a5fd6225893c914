"""prepare_lm_data: every --data form, the run's tokenizer, the token cache, eval on new text."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.data import english

from xmoe.data import (
    EOT,
    BPETokenizer,
    DataConfig,
    ValBatches,
    default_cache_dir,
    load_corpus,
    load_eval_tokens,
    load_tokenizer,
    prepare_lm_data,
    split_documents,
)


def config(path, tmp_path, **kwargs) -> DataConfig:
    return DataConfig(path=str(path), vocab_size=320, cache_dir=str(tmp_path / "cache"), **kwargs)


def entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def write_form(form: str, tmp_path):
    """The same 5 documents as a folder of .txt files or as a .jsonl file."""
    docs = [english(200, seed=seed) for seed in range(5)]
    if form == "folder":
        root = tmp_path / "docs"
        for k, doc in enumerate(docs):
            (root / f"part{k // 2}").mkdir(parents=True, exist_ok=True)
            (root / f"part{k // 2}" / f"{k}.txt").write_text(doc)
        return root, docs
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path, docs


def test_text_file_becomes_train_and_val_tokens(text_file, tmp_path):
    cfg = config(text_file, tmp_path)
    data = prepare_lm_data(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert data.vocab_size == data.tokenizer.vocab_size <= 320
    assert data.train_tokens.dtype == data.val_tokens.dtype == np.uint16
    train_docs, val_docs = split_documents(load_corpus(str(text_file)), cfg.val_fraction)
    assert data.tokenizer.decode(data.train_tokens) == "".join(doc + EOT for doc in train_docs)
    assert data.tokenizer.decode(data.val_tokens) == "".join(doc + EOT for doc in val_docs)
    assert 0.03 < len(data.val_tokens) / len(data.train_tokens) < 0.07
    assert data.tokenizer.decode(data.tokenizer.encode("the router.")) == "the router."
    assert str(text_file) in data.source


def test_test_fraction_holds_out_the_end_of_the_corpus(text_file, tmp_path):
    """train | val | test in corpus order, cut at line starts; no test split by default."""
    text = text_file.read_text()
    data = prepare_lm_data(config(text_file, tmp_path, val_fraction=0.1, test_fraction=0.2), tmp_path / "run")
    train, val, test = (data.tokenizer.decode(t).replace(EOT, "") for t in (data.train_tokens, data.val_tokens, data.test_tokens))
    assert train + val + test == text
    assert abs(len(test) / len(text) - 0.2) < 0.01 and abs(len(val) / len(text) - 0.1) < 0.01
    assert val.startswith(text[len(train)]) and text[len(train) - 1] == "\n" and text[len(train) + len(val) - 1] == "\n"
    first = next(iter(data.val_batches(batch_size=1, seq_len=8, split="test")))
    assert data.tokenizer.decode(first[0][0]) == data.tokenizer.decode(data.test_tokens[:8])

    plain = prepare_lm_data(config(text_file, tmp_path), tmp_path / "run")
    assert plain.test_tokens is None
    with pytest.raises(ValueError, match="data.test_fraction"):
        plain.val_batches(batch_size=1, seq_len=8, split="test")
    with pytest.raises(ValueError, match="test_fraction"):
        config(text_file, tmp_path, val_fraction=0.5, test_fraction=0.5)


@pytest.mark.parametrize("form", ["folder", "jsonl"])
def test_folder_and_jsonl_load_every_document(form, tmp_path):
    path, docs = write_form(form, tmp_path)
    data = prepare_lm_data(config(path, tmp_path), tmp_path / "run")
    stream = np.concatenate([data.train_tokens, data.val_tokens])
    assert int((stream == data.tokenizer.eot_id).sum()) == len(docs) + 1  # the split cuts one document
    assert data.tokenizer.decode(stream).replace(EOT, "") == "".join(docs)


def test_second_call_hits_the_cache(text_file, tmp_path, monkeypatch):
    cfg = config(text_file, tmp_path)
    first = prepare_lm_data(cfg, tmp_path / "run1")
    [entry] = entries(tmp_path / "cache")
    train_file = tmp_path / "cache" / entry / "train.npy"
    mtime = train_file.stat().st_mtime_ns

    def no_tokenizing(self, documents):
        raise AssertionError("tokenized again despite a cached entry")

    monkeypatch.setattr(BPETokenizer, "encode_documents", no_tokenizing)
    # a fresh run dir retrains the tokenizer; training is deterministic, so the key is the same
    second = prepare_lm_data(cfg, tmp_path / "run2")
    assert train_file.stat().st_mtime_ns == mtime
    assert isinstance(second.train_tokens, np.memmap)
    assert np.array_equal(first.train_tokens, second.train_tokens)
    assert np.array_equal(first.val_tokens, second.val_tokens)
    assert entries(tmp_path / "cache") == [entry]


def test_changed_content_or_tokenizer_misses_the_cache(text_file, tmp_path):
    first = prepare_lm_data(config(text_file, tmp_path), tmp_path / "run1")
    text_file.write_text(text_file.read_text() + "One more line at the end.\n")
    changed = prepare_lm_data(config(text_file, tmp_path), tmp_path / "run1")
    assert changed.fingerprint != first.fingerprint
    assert changed.cache_entry != first.cache_entry
    assert changed.tokenizer.decode(changed.val_tokens).endswith("One more line at the end.\n" + EOT)
    other_vocab = DataConfig(path=str(text_file), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    prepare_lm_data(other_vocab, tmp_path / "run2")
    assert len(entries(tmp_path / "cache")) == 3


def test_interrupted_cache_write_leaves_no_entry(text_file, tmp_path, monkeypatch):
    cfg = config(text_file, tmp_path)
    real_save = np.save
    calls = []

    def save_then_die(file, array):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # dies after writing train.npy, before val.npy
        real_save(file, array)

    monkeypatch.setattr(np, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_lm_data(cfg, tmp_path / "run")
    assert entries(tmp_path / "cache") == []  # neither an entry nor a temporary folder
    monkeypatch.setattr(np, "save", real_save)
    data = prepare_lm_data(cfg, tmp_path / "run")
    assert len(data.val_tokens) > 0 and entries(tmp_path / "cache") == [data.cache_entry.name]


def test_run_dir_tokenizer_is_reused(text_file, tmp_path, monkeypatch):
    first = prepare_lm_data(config(text_file, tmp_path), tmp_path / "run")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the run dir has a tokenizer")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    again = prepare_lm_data(config(text_file, tmp_path), tmp_path / "run")
    assert again.tokenizer.to_str() == first.tokenizer.to_str()
    smaller = DataConfig(path=str(text_file), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="vocab_size=300"):
        prepare_lm_data(smaller, tmp_path / "run")


def test_eval_text_uses_the_runs_tokenizer(text_file, tmp_path):
    prepare_lm_data(config(text_file, tmp_path), tmp_path / "run")
    new = tmp_path / "new.txt"
    new.write_text("A sentence the tokenizer never saw: zyzzyva!\n" * 20)
    tokenizer = load_tokenizer(tmp_path / "run")
    tokens = load_eval_tokens(str(new), tmp_path / "run", cache_dir=str(tmp_path / "cache"))
    assert tokens.tolist() == [*tokenizer.encode(new.read_text()), tokenizer.eot_id]
    again = load_eval_tokens(str(new), tmp_path / "run", cache_dir=str(tmp_path / "cache"))
    assert isinstance(again, np.memmap) and np.array_equal(tokens, again)
    assert len(list(ValBatches(tokens=tokens, batch_size=2, seq_len=8))) > 0


def test_missing_run_tokenizer_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="empty_run.*tokenizer.json"):
        load_tokenizer(tmp_path / "empty_run")


def test_corpus_too_small_for_a_batch_names_path_and_sizes(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(english(40))
    data = prepare_lm_data(config(small, tmp_path), tmp_path / "run")
    with pytest.raises(ValueError, match=r"train split of '.*small\.txt' has \d+ tokens.*needs"):
        data.train_batches(batch_size=64, seq_len=256)
    with pytest.raises(ValueError, match=r"validation split of '.*small\.txt'.*seq_len=256"):
        data.val_batches(batch_size=1, seq_len=256)
    x, y = data.train_batches(batch_size=2, seq_len=8, seed=3).batch(0)
    assert x.shape == (2, 8) and int(x.max()) < data.vocab_size


def test_errors_from_prepare_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        prepare_lm_data(config(tmp_path / "absent.txt", tmp_path), tmp_path / "run")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi\n")
    with pytest.raises(ValueError, match="tiny.txt"):
        prepare_lm_data(config(tiny, tmp_path), tmp_path / "run")


def test_default_corpus_end_to_end(tmp_path):
    cfg = DataConfig(vocab_size=512, cache_dir=str(tmp_path / "cache"))
    data = prepare_lm_data(cfg, tmp_path / "run")
    assert data.vocab_size == 512
    assert len(data.train_tokens) > 200_000
    assert 0.04 < len(data.val_tokens) / (len(data.train_tokens) + len(data.val_tokens)) < 0.07
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in data.source


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 256}, "vocab_size"),
        ({"vocab_size": 4096.0}, "vocab_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": float("nan")}, "val_fraction"),
        ({"path": ""}, "path"),
        ({"cache_dir": 3}, "cache_dir"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
        DataConfig(**kwargs)


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "xmoe" / "tokens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "xmoe" / "tokens"


def test_the_language_model_side_loads_no_translation_code():
    """xmoe.data exports the language-model data only: the LM task, and so `xmoe train`, load
    none of translation's data, task or model (checked in a fresh interpreter)."""
    code = ("import sys, xmoe.tasks.lm; "
            "print(sorted(m for m in sys.modules if m.startswith(('xmoe.data.translation', 'xmoe.tasks.mt', "
            "'xmoe.models.seq2seq'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
