"""The encoder-decoder: shapes, masks, padding never routed, the cache, greedy and beam search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.mt import BOS, EOS, FIRST_WORD, PAD, random_batch, record_routing, sharpen_routers, tiny_config
from xmoe.cli.main import main
from xmoe.models.seq2seq import Seq2Seq, Seq2SeqConfig, moe_flops_budget, num_params, sinusoidal_positions
from xmoe.moe import MoEConfig
from xmoe.presets import MT_PRESETS, get_mt_preset, list_mt_presets


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_shapes_and_stats_count_only_real_tokens(norm):
    model = Seq2Seq(tiny_config(norm=norm, dec_moe_every=2))
    src, tgt = random_batch(3, 7, 5)
    out = model(src, tgt)
    assert out.logits_BLV.shape == (3, 5, 40)
    assert len(out.stats) == 3  # encoder layers 1 and 2, decoder layer 2
    real_src, real_tgt = int((src != PAD).sum()), int((tgt != PAD).sum())
    assert real_src < src.numel() and real_tgt < tgt.numel()  # the batch has padding on both sides
    assert [s.num_tokens for s in out.stats] == [real_src, real_src, real_tgt]
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss > 0


def test_padding_is_never_routed_even_when_capacity_binds():
    """Extra padding columns and garbage in the pad embedding change nothing for real tokens:
    not their outputs, routing, capacity, dropped pairs, balancing loss or statistics. In
    training mode, so capacity is on: routed padding would change C and the drops."""
    model = Seq2Seq(tiny_config(dec_moe_every=1, capacity_factor=1.0, min_capacity=1))
    sharpen_routers(model)
    model.train()  # dropout is 0: training mode only turns capacity on
    src, tgt = random_batch(4, 9, 7)
    with record_routing(model) as calls:
        out = model(src, tgt)
    real_src, real_tgt = int((src != PAD).sum()), int((tgt != PAD).sum())
    assert [c[0].probs_TE.shape[0] for c in calls.values()] == [real_src, real_src, real_tgt, real_tgt]
    assert sum(int(s.dropped_pairs) for s in out.stats) > 0  # capacity really binds

    with torch.no_grad():
        model.embed.weight[PAD].normal_(std=3.0)
    out2 = model(F.pad(src, (0, 5), value=PAD), F.pad(tgt, (0, 4), value=PAD))
    real_BL = tgt != PAD
    # (the output layer is tied to the embeddings, so only the PAD logit itself may change)
    torch.testing.assert_close(out2.logits_BLV[:, :7][real_BL][:, PAD + 1:], out.logits_BLV[real_BL][:, PAD + 1:],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2.aux_loss, out.aux_loss)
    for a, b in zip(out.stats, out2.stats):
        assert (a.num_tokens, a.capacity) == (b.num_tokens, b.capacity)
        for name in ("tokens_per_expert", "kept_histogram", "wanted_histogram", "dropped_pairs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_cached_decoding_equals_full_forward_logits_and_routing():
    """Decoder MoE on: incremental decoding (a chunk of 4, then one token at a time) gives the
    full forward's logits and the same experts for every target token."""
    model = Seq2Seq(tiny_config(dec_moe_every=1)).eval()
    sharpen_routers(model)
    src, _ = random_batch(2, 6, 1)
    tgt = torch.randint(FIRST_WORD, 40, (2, 10))
    tgt[:, 0] = BOS
    dec_layers = [2, 3]  # MoE layer indices of the decoder (encoder: 0, 1)
    with torch.no_grad():
        memory = model.encode(src)
        with record_routing(model) as full_calls:
            full, _ = model.decode(tgt, memory)
        cache = model.new_cache()
        pieces = [(0, 4)] + [(t, t + 1) for t in range(4, 10)]
        with record_routing(model) as inc_calls:
            inc = torch.cat([model.decode(tgt[:, a:b], memory, cache)[0] for a, b in pieces], dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)
    for i in dec_layers:
        full_kept = full_calls[i][0].kept_TE.reshape(2, 10, -1)
        inc_kept = torch.cat([c.kept_TE.reshape(2, -1, full_kept.shape[-1]) for c in inc_calls[i]], dim=1)
        assert torch.equal(inc_kept, full_kept)
        assert full_kept.sum(-1).min() < full_kept.sum(-1).max()  # tokens differ in experts: a real check


def _per_token(kept_TE: torch.Tensor, real_BL: torch.Tensor) -> torch.Tensor:
    """Routed (real) tokens' expert choices put back at their [B, L] places; zeros at padding."""
    out_BLE = torch.zeros(*real_BL.shape, kept_TE.shape[-1], dtype=kept_TE.dtype)
    out_BLE[real_BL] = kept_TE
    return out_BLE


def test_cache_reordered_like_beam_search_with_finished_rows_fed_padding():
    """Beam search reorders the cache by a permutation with repeats and feeds PAD to finished
    rows. Decode 4 tokens, reorder rows by ``perm``, then decode 4 more one at a time with
    rows 1 and 3 finished (PAD) from the 2nd extra step: logits and experts of every real
    token equal one full forward on the reordered prefixes."""
    model = Seq2Seq(tiny_config(dec_moe_every=1)).eval()
    sharpen_routers(model)
    src, _ = random_batch(4, 6, 1)
    first = torch.randint(FIRST_WORD, 40, (4, 4))
    first[:, 0] = BOS
    later = torch.randint(FIRST_WORD, 40, (4, 4))
    later[[1, 3], 1:] = PAD
    perm = torch.tensor([2, 0, 2, 1])  # row 2 twice, row 3 dropped: as beam search's index
    with torch.no_grad():
        memory = model.encode(src)
        cache = model.new_cache()
        with record_routing(model) as inc_calls:
            head = model.decode(first, memory, cache)[0]
            cache.reorder(perm)
            memory_perm = model.encode(src[perm])  # the memory of the reordered rows, computed afresh
            tail = [model.decode(later[:, t:t + 1], memory_perm, cache)[0] for t in range(4)]
        full_in = torch.cat([first[perm], later], dim=1)
        with record_routing(model) as full_calls:
            full, _ = model.decode(full_in, memory_perm)
    real_BL = full_in != PAD
    inc = torch.cat([head[perm], *tail], dim=1)
    torch.testing.assert_close(inc[real_BL], full[real_BL], rtol=1e-5, atol=1e-5)
    for i in (2, 3):  # the decoder's MoE layers
        calls = inc_calls[i]
        pieces = [_per_token(calls[0].kept_TE, first != PAD)[perm]]
        pieces += [_per_token(c.kept_TE, later[:, t:t + 1] != PAD) for t, c in enumerate(calls[1:])]
        assert torch.equal(torch.cat(pieces, dim=1), _per_token(full_calls[i][0].kept_TE, real_BL))


def _naive_greedy(model: Seq2Seq, src_1S: torch.Tensor, max_words: int) -> list[int]:
    """Greedy decoding of one sentence by full forward passes, no cache, no batching; PAD and
    BOS are never produced."""
    ys = [BOS]
    with torch.no_grad():
        for _ in range(max_words):
            logits = model(src_1S, torch.tensor([ys])).logits_BLV[0, -1]
            logits[[PAD, BOS]] = float("-inf")
            token = int(logits.argmax())
            if token == EOS:
                break
            ys.append(token)
    return ys[1:]


def _decoding_model() -> Seq2Seq:
    """An untrained model with decoder MoE (at seed 0 its greedy outputs end early for some
    sentences and run to the length limit for others)."""
    model = Seq2Seq(tiny_config(dec_moe_every=1)).eval()
    sharpen_routers(model)
    return model


def test_greedy_equals_naive_loop_and_beam_one():
    model = _decoding_model()
    src, _ = random_batch(5, 6, 1)
    greedy = model.greedy(src, max_len_a=0.0, max_len_b=12)
    assert len({len(g) for g in greedy}) > 1  # varied lengths: EOS handling is exercised
    for b in range(5):
        row = src[b:b + 1, : int((src[b] != PAD).sum())]
        assert greedy[b] == _naive_greedy(model, row, 11)  # the 12th token is EOS at the latest
    assert model.beam_search(src, beam=1, max_len_a=0.0, max_len_b=12) == greedy


def _alone(src_BS: torch.Tensor, b: int) -> torch.Tensor:
    """Row ``b`` of a batch as a batch of one, without its padding."""
    return src_BS[b:b + 1, : int((src_BS[b] != PAD).sum())]


def test_batched_beam_search_equals_one_sentence_at_a_time():
    """With the default length limit (1.5 x source length + 10), which differs between the
    sentences of the batch: each sentence's limit is its own, not the padded width's."""
    model = _decoding_model()
    src, _ = random_batch(4, 6, 1)
    batched = model.beam_search(src, beam=3, length_penalty=1.0)
    alone = [model.beam_search(_alone(src, b), beam=3)[0] for b in range(4)]
    assert batched == alone
    lengths = (src != PAD).sum(1).tolist()
    # a sentence shorter than the batch width runs to its own limit (EOS excluded): a real check
    assert any(n < 6 and len(hyp) == int(1.5 * n + 10) - 1 for n, hyp in zip(lengths, alone))


def test_batched_greedy_equals_one_sentence_at_a_time():
    """As above for greedy decoding, also against the naive loop with each sentence's limit."""
    model = _decoding_model()
    src, _ = random_batch(4, 6, 1)
    batched = model.greedy(src)
    limits = [int(1.5 * n + 10) for n in (src != PAD).sum(1).tolist()]
    for b, limit in enumerate(limits):
        assert batched[b] == model.greedy(_alone(src, b))[0] == _naive_greedy(model, _alone(src, b), limit - 1)
    assert any(limit < limits[0] and len(hyp) == limit - 1 for limit, hyp in zip(limits, batched))


def test_beam_search_keeps_the_best_scored_hypothesis():
    """A beam wider than all candidates and a 3-token limit (EOS included) make beam search
    exhaustive: its answer must have the best ``log p / length ** alpha`` of every hypothesis
    of at most 2 tokens, each scored here by teacher forcing, for every length penalty alpha."""
    model = Seq2Seq(tiny_config(router=None, vocab_size=6)).eval()
    src = torch.tensor([[4, 5, 4, EOS]])

    def logp(hyp):
        with torch.no_grad():
            logp_LV = model(src, torch.tensor([[BOS, *hyp]])).logits_BLV[0].log_softmax(-1)
        return sum(float(logp_LV[i, t]) for i, t in enumerate([*hyp, EOS]))

    tokens = (1, 4, 5)  # UNK and the words; PAD and BOS are never produced
    candidates = [[]] + [[a] for a in tokens] + [[a, b] for a in tokens for b in tokens]
    answers = []
    for alpha in (0.0, 1.0, 4.0):
        best = model.beam_search(src, beam=12, length_penalty=alpha, max_len_a=0.0, max_len_b=3)[0]
        scores = sorted(logp(c) / (len(c) + 1) ** alpha for c in candidates)
        assert scores[-1] - scores[-2] > 1e-4  # one clear best
        assert logp(best) / (len(best) + 1) ** alpha == pytest.approx(scores[-1], abs=1e-6)
        answers.append(best)
    assert len({len(a) for a in answers}) > 1  # the length penalty changes the answer here


def test_a_source_row_without_real_tokens_is_an_error():
    model = Seq2Seq(tiny_config()).eval()
    src = torch.tensor([[5, 6, EOS], [PAD, PAD, PAD]])
    with pytest.raises(ValueError, match="at least one real token"):
        model.encode(src)


@pytest.mark.parametrize("search", ["greedy", "beam_search"])
def test_decoding_refuses_training_mode_and_leaves_it(search):
    """As decode with a cache: decoding needs eval mode, and the mode is the caller's."""
    model = Seq2Seq(tiny_config())
    src, _ = random_batch(2, 3, 1)
    with pytest.raises(ValueError, match="eval"):
        getattr(model, search)(src)
    assert model.training


def test_cache_refused_in_training_mode():
    model = Seq2Seq(tiny_config())
    src, tgt = random_batch(1, 3, 2)
    with pytest.raises(ValueError, match="eval"):
        model.decode(tgt, model.encode(src), model.new_cache())


def test_sinusoidal_positions_match_the_formula():
    table = sinusoidal_positions(50, 16)
    for p, i in ((0, 0), (7, 2), (49, 7)):
        angle = p / 10000 ** (2 * i / 16)
        assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_head=3), "divisible"),
        (dict(norm="mid"), "norm"),
        (dict(pad_id=2), "distinct"),
        (dict(enc_moe_every=0), "no MoE layer"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    base = tiny_config()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__} | kw
    with pytest.raises(ValueError, match=match):
        Seq2SeqConfig(**fields)


def test_presets_follow_the_paper():
    cfg = get_mt_preset("base-xmoe-64x1024")
    assert (cfg.n_enc_layer, cfg.n_dec_layer, cfg.d_model, cfg.d_ff, cfg.n_head) == (6, 6, 512, 2048, 8)
    assert cfg.enc_moe_layer_indices == (1, 3, 5) and cfg.dec_moe_layer_indices == ()  # layers 2, 4, 6
    moe = cfg.moe
    assert (moe.num_experts, moe.expert_dim, moe.threshold, moe.capacity_factor) == (64, 1024, 0.9, 2.0)
    assert cfg.norm == "post"
    # top-2 over the same experts: equal parameters; its budget is one dense 2048 FFN per MoE layer
    top2 = get_mt_preset("base-top2-64x1024", vocab_size=1000)
    xmoe = get_mt_preset("base-xmoe-64x1024", vocab_size=1000)
    with torch.device("meta"):  # counts without allocating 256M parameters
        assert num_params(Seq2Seq(top2)) == num_params(Seq2Seq(xmoe))
    assert moe_flops_budget(xmoe) == 3 * 2 * (2 * 512 * 2048)
    assert all(name in MT_PRESETS for name in ("cpu-xmoe-32x512", "cpu-top2-32x512", "debug-dense"))


@pytest.mark.parametrize("name", list(MT_PRESETS))
def test_every_preset_counts_its_parameters_from_the_config(name):
    """`xmoe presets` counts from the config (no torch); the model built on the meta device is
    the independent count."""
    cfg = get_mt_preset(name)
    with torch.device("meta"):
        assert num_params(cfg) == sum(p.numel() for p in Seq2Seq(cfg).parameters())


@pytest.mark.parametrize("kw", [
    dict(norm="pre"),  # a final LayerNorm per stack
    dict(dec_moe_every=1, enc_moe_every=0),  # MoE in the decoder only
    dict(dec_moe_every=2, n_dec_layer=3),
    dict(activation="swiglu", expert_bias=False),
    dict(activation="relu", expert_bias=True, n_enc_layer=3, dec_moe_every=3, n_dec_layer=3),
])
def test_parameter_count_of_a_config_equals_the_built_model(kw):
    moe_kw = {k: kw.pop(k) for k in ("activation", "expert_bias") if k in kw}
    moe = MoEConfig(model_dim=16, num_experts=4, expert_dim=8, **moe_kw)
    layout = dict(vocab_size=40, max_len=12, n_enc_layer=2, n_dec_layer=2, n_head=2, d_model=16, d_ff=24)
    cfg = Seq2SeqConfig(moe=moe, **(layout | kw))
    assert num_params(cfg) == sum(p.numel() for p in Seq2Seq(cfg).parameters())


def test_presets_are_listed_with_their_real_sizes(capsys):
    rows = {row.name: row for row in list_mt_presets()}
    assert list(rows) == list(MT_PRESETS)
    for name in ("debug-dense", "debug-xmoe-16x64", "cpu-switch-16x1024"):  # built for real here
        assert rows[name].params == sum(p.numel() for p in Seq2Seq(get_mt_preset(name)).parameters())
    assert rows["base-xmoe-64x1024"].experts == "64x1024 t=0.9 in encoder layers 2, 4, 6"
    assert rows["base-dense"].experts == "dense" and rows["base-dense"].moe_flops_per_token == 0
    main(["presets"])
    out = capsys.readouterr().out
    assert "| gpt2-xmoe-64x384 |" in out and "| base-top2-64x1024 | 6+6 d512 | 64x1024 top-2 in encoder" in out
