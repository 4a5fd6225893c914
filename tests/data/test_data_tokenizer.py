"""Byte-level BPE tokenizer: exact round trips, separators, save/load, piece-wise encoding."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.data import english
from tokenizers import Tokenizer, models

from xmoe.data import EOT, BPETokenizer
from xmoe.data.tokenizer import split_text

ROUND_TRIP = [
    "Hello, world!",
    "  leading spaces, trailing tabs\t\t\n\n\n",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 \u0301 combining",
    "def f(x):\n    return x ** 2  # code\r\n",
    "words never seen: zyzzyva quixotic",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train([english(3000)], vocab_size=400)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_inverts_encode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.array(ids, dtype=np.uint16)) == text


def test_training_learns_merges_up_to_the_vocab_size(tokenizer):
    assert tokenizer.vocab_size == 400
    assert tokenizer.eot_id == 0
    text = english(10, seed=99)
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2  # merges, not bytes
    small = BPETokenizer.train(["tiny text"], vocab_size=400)
    assert 257 <= small.vocab_size < 400  # too little text for every merge


def test_training_is_deterministic():
    docs = [english(500, seed=1), english(500, seed=2)]
    first = BPETokenizer.train(docs, vocab_size=300)
    second = BPETokenizer.train(docs, vocab_size=300)
    assert first.to_str() == second.to_str()


def test_documents_are_followed_by_eot(tokenizer):
    docs = ["first doc.", "second doc\n", "third"]
    stream = tokenizer.encode_documents(docs)
    expected = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eot_id]]
    assert stream.dtype == np.uint16
    assert stream.tolist() == expected
    assert tokenizer.decode(stream) == EOT.join(docs) + EOT


def test_save_and_load_give_the_same_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.to_str() == tokenizer.to_str()
    text = english(20, seed=5)
    assert loaded.encode(text) == tokenizer.encode(text)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BPETokenizer.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{ not a tokenizer")
    with pytest.raises(ValueError, match="broken.json"):
        BPETokenizer.load(broken)


def test_large_vocabularies_use_uint32():
    vocab = {f"t{i}": i for i in range(70_000)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.add_special_tokens([EOT])
    big = BPETokenizer(raw)
    assert big.vocab_size > 65536 and big.dtype == np.uint32
    assert BPETokenizer(raw).encode_documents(["t69999"]).dtype == np.uint32


def test_pieces_encode_like_the_whole_text():
    unit = "Ends here.\nStarts  here\n\n  indented\r\nit's\n\u00e9t\u00e9\nX\n \nY.\n\t\nZ"
    text = unit * 50
    # trained on the same text, so runs of whitespace have merges a bad cut would break
    tokenizer = BPETokenizer.train([text, english(200)], vocab_size=400)
    pieces = list(split_text(text, 7))
    assert len(pieces) > 20 and "".join(pieces) == text
    assert all(len(p) >= 7 for p in pieces[:-1])
    whole = tokenizer.encode(text)
    assert [i for p in pieces for i in tokenizer.encode(p)] == whole
    assert tokenizer.encode_documents([text]).tolist() == [*whole, tokenizer.eot_id]


def test_bpe_training_never_sees_a_run_longer_than_the_bound(monkeypatch):
    """Item 15 of issue 18: 5 MB without whitespace took hours (training is quadratic in a word's
    length). Training pieces are cut inside long runs; the pieces join back to the text."""
    import random
    import re

    from tokenizers import Tokenizer

    from xmoe.data.tokenizer import MAX_TRAIN_RUN, bounded_runs

    rng = random.Random(0)
    long_run = "".join(rng.choice("abcdefgh") for _ in range(20 * MAX_TRAIN_RUN + 7))
    text = f"some words\n{long_run} and {'x' * MAX_TRAIN_RUN} then more words"
    pieces = list(bounded_runs(text))
    assert "".join(pieces) == text
    longest = max(len(m.group()) for piece in pieces for m in re.finditer(r"\S+", piece))
    assert longest == MAX_TRAIN_RUN  # the run of exactly MAX_TRAIN_RUN x's is left whole
    seen = []
    original = Tokenizer.train_from_iterator

    def spy(self, iterator, *args, **kwargs):
        pieces = list(iterator)
        seen.extend(pieces)
        return original(self, iter(pieces), *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "train_from_iterator", spy)
    tok = BPETokenizer.train([text], vocab_size=300)
    assert max(len(m.group()) for piece in seen for m in re.finditer(r"\S+", piece)) <= MAX_TRAIN_RUN
    assert tok.decode(tok.encode(text)) == text  # encoding is not cut: any text round-trips
