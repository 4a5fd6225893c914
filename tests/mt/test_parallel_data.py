"""Parallel text: line checks, the joint sentencepiece vocabulary, filtering, bucketed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmoe.data.translation import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPM_FILE,
    Pairs,
    TranslationDataConfig,
    TokenBatches,
    prepare_translation_data,
    read_sentence_pairs,
)


def test_mismatched_line_counts_are_a_clear_error(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    with pytest.raises(ValueError, match=r"a\.en has 3 lines.*a\.de has 2"):
        read_sentence_pairs(tmp_path / "a.en", tmp_path / "a.de")


def test_missing_file_and_half_validation_pair(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.en"):
        read_sentence_pairs(tmp_path / "nope.en", tmp_path / "nope.de")
    with pytest.raises(ValueError, match="valid_src and data.valid_tgt go together"):
        TranslationDataConfig(src="a", tgt="b", valid_src="c")


def test_vocabulary_is_joint_saved_and_round_trips(toy_files, tmp_path):
    (src, tgt), (vsrc, vtgt) = toy_files["train"], toy_files["valid"]
    data = prepare_translation_data(TranslationDataConfig(src=src, tgt=tgt, valid_src=vsrc, valid_tgt=vtgt,
                                                    vocab_size=60), tmp_path / "run")
    assert (tmp_path / "run" / SPM_FILE).is_file()
    vocab = data.vocab
    for line in ("sun moon bird", "DRIB NOOM NUS"):  # a source and a target sentence: one vocabulary
        ids = vocab.encode(line)
        assert vocab.unk_id not in ids and vocab.decode(ids) == line
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(data.train) == 600 and len(data.valid) == 30


def test_resume_without_the_saved_vocabulary_is_an_error(toy_files, tmp_path):
    """A resume must reuse the run's spm.model: retraining it could renumber the pieces."""
    src, tgt = toy_files["train"]
    cfg = TranslationDataConfig(src=src, tgt=tgt, vocab_size=60)
    with pytest.raises(FileNotFoundError, match="spm.model"):
        prepare_translation_data(cfg, tmp_path / "run", reuse_vocab=True)
    assert not (tmp_path / "run" / SPM_FILE).exists()


def _pairs(src_lens, tgt_lens) -> Pairs:
    """Pairs whose token ids encode (pair number, position), so batches can be checked exactly."""
    src = [np.array([100 + 1000 * i + j for j in range(n)]) for i, n in enumerate(src_lens)]
    tgt = [np.array([200 + 1000 * i + j for j in range(n)]) for i, n in enumerate(tgt_lens)]
    return Pairs(src=src, tgt=tgt, lines=np.arange(len(src)))


def test_over_long_pairs_are_filtered(toy_files, tmp_path):
    src, tgt = toy_files["train"]
    data = prepare_translation_data(TranslationDataConfig(src=src, tgt=tgt, vocab_size=60, max_len=8, max_tokens=64,
                                                    val_lines=10), tmp_path / "run")
    vocab = data.vocab
    lines_src, lines_tgt = open(src).read().splitlines()[:-10], open(tgt).read().splitlines()[:-10]
    expected = [i for i, (s, t) in enumerate(zip(lines_src, lines_tgt))
                if len(vocab.encode(s)) + 1 <= 8 and len(vocab.encode(t)) + 1 <= 8]
    assert 0 < data.train.num_filtered == len(lines_src) - len(expected)
    assert data.train.lines.tolist() == expected


def test_batches_are_bucketed_padded_and_a_pure_function_of_the_index():
    rng = np.random.default_rng(0)
    src_lens, tgt_lens = rng.integers(1, 20, 200), rng.integers(1, 20, 200)
    pairs = _pairs(src_lens, tgt_lens)
    batches = TokenBatches(pairs=pairs, max_tokens=100, seed=3)
    n = len(batches)
    seen = []
    for i in range(n):  # one epoch
        src_BS, tgt_in_BL, tgt_out_BL = batches.batch(i)
        assert src_BS.shape[0] * max(src_BS.shape[1], tgt_in_BL.shape[1]) <= 100
        for row in range(src_BS.shape[0]):
            k = int(src_BS[row, 0]) // 1000
            s, t = src_lens[k], tgt_lens[k]
            assert src_BS[row, :s].tolist() == pairs.src[k].tolist() and src_BS[row, s] == EOS_ID
            assert (src_BS[row, s + 1:] == PAD_ID).all()
            assert tgt_in_BL[row, : t + 1].tolist() == [BOS_ID, *pairs.tgt[k].tolist()]
            assert tgt_out_BL[row, : t + 1].tolist() == [*pairs.tgt[k].tolist(), EOS_ID]
            assert (tgt_in_BL[row, t + 1:] == PAD_ID).all() and (tgt_out_BL[row, t + 1:] == PAD_ID).all()
            seen.append(k)
    assert sorted(seen) == list(range(200))  # every pair exactly once per epoch
    again = TokenBatches(pairs=pairs, max_tokens=100, seed=3)
    for i in (0, 5, n + 2, 7 * n + 1):
        assert all(torch.equal(a, b) for a, b in zip(batches.batch(i), again.batch(i)))
    epoch0 = [batches.batch(i)[0][0, 0].item() for i in range(n)]
    epoch1 = [batches.batch(n + i)[0][0, 0].item() for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same batches, another order
    # bucketing: rows of a batch have similar lengths, far tighter than random batching would give
    spread = np.mean([np.ptp([src_lens[int(k) // 1000] for k in batches.batch(i)[0][:, 0]]) for i in range(n)])
    assert spread <= 1.0
