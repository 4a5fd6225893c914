"""Batches: train batch i is a pure function of (seed, i); validation is a fixed sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmoe.data import TrainBatches, ValBatches


def ramp(n: int) -> np.ndarray:
    """Tokens 0, 1, ..., n-1 (mod 65536): every window is a visible run of consecutive ids."""
    return (np.arange(n) % 65536).astype(np.uint16)


def test_batch_i_is_the_same_for_independent_objects():
    tokens = np.random.default_rng(0).integers(0, 4096, size=5000).astype(np.uint16)
    a = TrainBatches(tokens=tokens, batch_size=4, seq_len=32, seed=7)
    b = TrainBatches(tokens=tokens.copy(), batch_size=4, seq_len=32, seed=7)
    for i in (0, 1, 17, 10**9):
        xa, ya = a.batch(i)
        xb, yb = b.batch(i)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    other_seed = TrainBatches(tokens=tokens, batch_size=4, seq_len=32, seed=8)
    assert not torch.equal(a.batch(0)[0], other_seed.batch(0)[0])


def test_resume_continues_exactly():
    batches = TrainBatches(tokens=ramp(3000), batch_size=3, seq_len=16, seed=1)
    uninterrupted = [x for x, _ in zip(iter(batches), range(6))]
    resumed = TrainBatches(tokens=ramp(3000), batch_size=3, seq_len=16, seed=1).iter_from(4)
    for step in (4, 5):
        assert torch.equal(next(resumed)[0], uninterrupted[step][0])


def test_windows_are_contiguous_shifted_and_in_range():
    n, seq_len = 40, 8
    batches = TrainBatches(tokens=ramp(n), batch_size=4, seq_len=seq_len, seed=0)
    starts = set()
    for i in range(200):
        x, y = batches.batch(i)
        assert x.shape == y.shape == (4, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one token
        assert torch.equal(x, x[:, :1] + torch.arange(seq_len))  # contiguous windows
        assert x.min() >= 0 and y.max() <= n - 1
        starts.update(x[:, 0].tolist())
    assert starts == set(range(n - seq_len))  # every valid start, the last one included


def test_too_few_tokens_for_a_batch_names_the_sizes():
    with pytest.raises(ValueError, match=r"my corpus has 64 tokens.*batch_size=4 x seq_len=16.*65"):
        TrainBatches(tokens=ramp(64), batch_size=4, seq_len=16, name="my corpus")
    TrainBatches(tokens=ramp(65), batch_size=4, seq_len=16)  # exactly enough


@pytest.mark.parametrize(
    "kwargs, field",
    [({"batch_size": 0}, "batch_size"), ({"seq_len": -1}, "seq_len"), ({"seed": -3}, "seed")],
)
def test_bad_settings_name_the_field(kwargs, field):
    settings = {"tokens": ramp(100), "batch_size": 2, "seq_len": 4, **kwargs}
    with pytest.raises(ValueError, match=f"TrainBatches.{field}"):
        TrainBatches(**settings)


def test_tokens_must_be_a_1d_integer_array():
    with pytest.raises(ValueError, match="TrainBatches.tokens"):
        TrainBatches(tokens=np.zeros((10, 10), np.int64), batch_size=1, seq_len=2)
    with pytest.raises(ValueError, match="ValBatches.tokens"):
        ValBatches(tokens=np.zeros(100, np.float32), batch_size=1, seq_len=2)


def test_negative_batch_index_is_refused():
    with pytest.raises(ValueError, match="batch index"):
        TrainBatches(tokens=ramp(100), batch_size=2, seq_len=4).batch(-1)


def test_val_batches_cover_the_tokens_in_order_without_overlap():
    n, seq_len = 1000, 16  # (n - 1) // 16 = 62 windows: 6 batches of 10, then one of 2
    val = ValBatches(tokens=ramp(n), batch_size=10, seq_len=seq_len)
    batches = list(val)
    assert len(val) == len(batches) == 7 and val.num_windows == 62
    assert [x.shape[0] for x, _ in batches] == [10] * 6 + [2]
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    assert torch.equal(x_all.reshape(-1), torch.arange(62 * seq_len))
    assert torch.equal(y_all, x_all + 1)
    again = list(ValBatches(tokens=ramp(n), batch_size=10, seq_len=seq_len))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_val_max_batches_keeps_the_first_ones():
    full = ValBatches(tokens=ramp(1000), batch_size=10, seq_len=16)
    capped = ValBatches(tokens=ramp(1000), batch_size=10, seq_len=16, max_batches=3)
    assert len(capped) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped, full))
    with pytest.raises(IndexError):
        capped.batch(3)
    with pytest.raises(ValueError, match="ValBatches.max_batches"):
        ValBatches(tokens=ramp(1000), batch_size=10, seq_len=16, max_batches=0)


def test_val_too_small_names_the_sizes():
    with pytest.raises(ValueError, match=r"val of x has 16 tokens.*seq_len=16 needs at least 17"):
        ValBatches(tokens=ramp(16), batch_size=2, seq_len=16, name="val of x")
