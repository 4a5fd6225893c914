"""Translation training on the shared loop: a tiny model learns a toy task, exact resume,
checkpoint round trip, sacreBLEU scores, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF

from helpers.mt import BOS, EOS, FIRST_WORD, PAD, tiny_config
from xmoe.cli.main import main
from xmoe.data.translation import TranslationDataConfig, pad, prepare_translation_data
from xmoe.models.seq2seq import Seq2Seq
from xmoe.tasks import mt as mt_module
from xmoe.training import runs as runs_module
from xmoe.training import LoadedRun, read_metrics
from xmoe.training.loop import train as loop_train
from xmoe.tasks.mt import (
    corpus_scores,
    evaluate_mt,
    label_smoothed_loss,
    load_mt,
    mt_run_config,
    train_mt,
    translate,
    translate_lines,
)


def _id_task(rng: random.Random, n: int):
    """Id-level toy translation: each word w becomes 4 + (5 w) mod 12, in order."""
    src, tgt = [], []
    for _ in range(n):
        words = [rng.randrange(FIRST_WORD, FIRST_WORD + 12) for _ in range(rng.randint(2, 5))]
        src.append(torch.tensor([*words, EOS]))
        tgt.append(torch.tensor([FIRST_WORD + (w * 5) % 12 for w in words]))
    return src, tgt


def test_tiny_model_learns_the_toy_task():
    """200 Adam steps (a few seconds): the loss falls from ln V to near the label-smoothing
    floor, and most greedy translations of held-out sentences are exactly right."""
    model = Seq2Seq(tiny_config(router="threshold", dec_moe_every=2, vocab_size=16, capacity_factor=2.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    rng = random.Random(0)
    losses = []
    for _ in range(200):
        src, tgt = _id_task(rng, 32)
        src_BS = pad([s.numpy() for s in src])
        tgt_in = pad([torch.cat([torch.tensor([BOS]), t]).numpy() for t in tgt])
        tgt_out = pad([torch.cat([t, torch.tensor([EOS])]).numpy() for t in tgt])
        out = model(src_BS, tgt_in)
        loss = label_smoothed_loss(out.logits_BLV, tgt_out, 0.1) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[0] > 2.5 and sum(losses[-10:]) / 10 < 0.9
    src, tgt = _id_task(random.Random(1), 50)
    hyps = model.greedy(pad([s.numpy() for s in src]), max_len_a=1.0, max_len_b=4)
    accuracy = sum(h == t.tolist() for h, t in zip(hyps, tgt)) / len(tgt)
    assert accuracy >= 0.8


def test_label_smoothed_loss_ignores_padding_and_matches_the_formula():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    target = torch.tensor([[1, 4, PAD], [2, PAD, PAD]])
    eps, total, count = 0.1, 0.0, 0
    for b in range(2):
        for i in range(3):
            if target[b, i] == PAD:
                continue
            logp = logits[b, i].log_softmax(-1)
            total += -(1 - eps) * logp[target[b, i]] - eps * logp.mean()
            count += 1
    assert float(label_smoothed_loss(logits, target, eps)) == pytest.approx(float(total) / count, rel=1e-6)


def test_base_recipe_is_the_papers_optimizer():
    """Adam (0.9, 0.98), inverse square root after 512 fixed warm-up steps (docs/method.md)."""
    train = mt_run_config("base-xmoe-64x1024").train
    assert (train.betas, train.schedule, train.warmup_steps) == ((0.9, 0.98), "inverse_sqrt", 512)


def test_scores_are_sacrebleus():
    hyps, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "a dog barked"]
    scores = corpus_scores(hyps, refs)
    assert scores["bleu"] == BLEU().corpus_score(hyps, [refs]).score
    assert scores["chrf"] == CHRF(word_order=2).corpus_score(hyps, [refs]).score
    assert "nrefs:1" in scores["bleu_signature"] and "nw:2" in scores["chrf_signature"]
    assert corpus_scores(refs, refs)["bleu"] == pytest.approx(100.0)


class _Oracle(Seq2Seq):
    """A model whose "translation" of a source is the encoded reference of that source."""

    def __init__(self, cfg, answers: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(cfg)
        self.answers = answers

    def beam_search(self, src_BS, **_):
        return [self.answers[tuple(row[row != PAD].tolist())] for row in src_BS]


def test_bleu_scores_detokenised_text_against_raw_references(toy_files, tmp_path):
    """Hypotheses leave the decode path as detokenised text (no sentencepiece pieces) and are
    scored against the raw reference lines: an oracle decoder scores BLEU 100."""
    (src, tgt), (vsrc, vtgt) = toy_files["train"], toy_files["valid"]
    data = prepare_translation_data(TranslationDataConfig(src=src, tgt=tgt, valid_src=vsrc, valid_tgt=vtgt,
                                                    vocab_size=60), tmp_path)
    vocab, src_lines, refs = data.vocab, data.valid_src, data.valid_ref
    cfg = _cfg(toy_files)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab.vocab_size))
    answers = {(*vocab.encode(s), EOS): vocab.encode(r) for s, r in zip(src_lines, refs)}
    summary, hyps = evaluate_mt(LoadedRun(_Oracle(cfg.model, answers).eval(), cfg, tmp_path, vocab), src_lines, refs)
    assert hyps == refs and summary["bleu"] == pytest.approx(100.0)

    real = translate_lines(Seq2Seq(cfg.model), vocab, src_lines[:8], cfg.decode)  # untrained: word salad
    assert any(real) and not any("\u2581" in h for h in real)


def _cfg(toy_files, **overrides):
    (src, tgt), (vsrc, vtgt) = toy_files["train"], toy_files["valid"]
    base = {"data.src": src, "data.tgt": tgt, "data.valid_src": vsrc, "data.valid_tgt": vtgt,
            "data.vocab_size": "60", "data.max_tokens": "256", "train.max_steps": "4", "train.save_every": "2",
            "train.log_every": "1", "train.device": "cpu", "eval_bleu_sentences": "0", "model.dropout": "0.1",
            "model.dec_moe_every": "2", "decode.beam": "2"}
    return mt_run_config("debug-xmoe-16x64", overrides={**base, **overrides})


def test_resume_is_exact_and_checkpoint_translations_round_trip(toy_files, tmp_path, monkeypatch):
    trained = []  # the model object the shared loop trained, kept in memory

    def train_and_keep(model, *args, **kwargs):
        trained.append(model)
        return loop_train(model, *args, **kwargs)

    monkeypatch.setattr(runs_module, "train", train_and_keep)
    straight = train_mt(_cfg(toy_files), tmp_path / "a", progress=False)
    first = train_mt(_cfg(toy_files, **{"train.max_steps": "2"}), tmp_path / "b", progress=False)
    second = train_mt(_cfg(toy_files), tmp_path / "b", resume=True, progress=False)
    assert first.train_losses + second.train_losses == straight.train_losses
    a, b = load_mt(tmp_path / "a", device="cpu"), load_mt(tmp_path / "b", device="cpu")
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]

    with pytest.raises(ValueError, match="may not change: data.max_tokens"):
        train_mt(_cfg(toy_files, **{"train.max_steps": "6", "data.max_tokens": "300"}), tmp_path / "b", resume=True)

    # The model trained in memory and the one rebuilt from its checkpoint (config.json, weights,
    # spm.model) translate alike, and differently from an untrained model: a real round trip.
    lines = open(toy_files["valid"][0]).read().splitlines()[:8]
    in_memory = translate_lines(trained[0], a.vocab, lines, a.cfg.decode)
    assert trained[0] is not a.model and translate(a, lines) == in_memory
    assert translate_lines(Seq2Seq(a.cfg.model), a.vocab, lines, a.cfg.decode) != in_memory


def test_translate_strips_windows_line_ends(monkeypatch, capsys):
    """Lines read from stdin lose "\\r\\n" as well as "\\n" before translation."""
    import io

    seen = []
    monkeypatch.setattr("xmoe.cli.mt._load", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(mt_module, "translate", lambda loaded, lines, decode: seen.extend(lines) or list(lines))
    monkeypatch.setattr("sys.stdin", io.StringIO("sun moon\r\nbird\n\r\n"))
    main(["translate", "--checkpoint", "unused"])
    assert seen == ["sun moon", "bird", ""]
    assert capsys.readouterr().out == "sun moon\nbird\n\n"


def test_cli_train_translate_eval(toy_files, tmp_path, capsys, monkeypatch):
    (src, tgt), (vsrc, vtgt) = toy_files["train"], toy_files["valid"]
    out = tmp_path / "run"
    main(["train-mt", "--preset", "debug-top2-16x64", f"--data.src={src}", f"--data.tgt={tgt}",
          f"--data.valid_src={vsrc}", f"--data.valid_tgt={vtgt}", "--out", str(out), "--train.max_steps=3", "--data.vocab_size=60",
          "--data.max_tokens=256", "--eval_bleu_sentences=3", "--train.device=cpu"])
    assert "validation loss" in capsys.readouterr().out
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["preset"] == "debug-top2-16x64" and (out / "spm.model").is_file()

    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("sun moon\nbird\n"))
    main(["translate", "--checkpoint", str(out), "--beam", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 2

    main(["eval-mt", "--checkpoint", str(out), "--src", vsrc, "--ref", vtgt, "--beam", "1"])
    text = capsys.readouterr().out
    assert "BLEU = " in text and "nrefs:1|case:mixed|eff:no|tok:13a" in text
    assert "chrF2++ = " in text and "experts per token" in text and "of the top-k model" in text

    bad = tmp_path / "short.de"
    bad.write_text("eins\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-mt", "--checkpoint", str(out), "--src", vsrc, "--ref", str(bad)])
    assert exit_info.value.code == 2
    assert "differ in length" in capsys.readouterr().err
