"""Machine translation: the task a Seq2Seq model trains on, its run config and recipe, decoding
and evaluation (BLEU and chrF++ from sacreBLEU, routing statistics, MoE FLOPs), and the entry
points the CLI wires up (train, load, translate, evaluate).

Recipe (XMoE, Yang et al. 2024, Sec. 4; docs/method.md "Machine translation"): label-smoothed
cross entropy (0.1; Szegedy et al. 2016) over real target tokens, Adam (0.9, 0.98), inverse
square-root schedule after a linear warm-up (512 steps at base size), dropout in the model
config, and ``+ aux_loss_coef * sum of the MoE balancing losses`` (0.01). BLEU (Papineni et al. 2002) and
chrF++ (Popović 2017; ``CHRF(word_order=2)``) are sacreBLEU's (Post 2018), reported with their
signatures; nothing here re-implements them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xmoe.data.translation import (
    SPM_FILE,
    PAD_ID,
    TranslationData,
    TranslationDataConfig,
    Pairs,
    SubwordVocab,
    encode_pairs,
    eval_batches,
    load_subword_vocab,
    prepare_translation_data,
    source_batches,
)
from xmoe.distributed import Ranks
from xmoe.errors import UsageError, check_counts
from xmoe.extras import check_extra, needs_extra
from xmoe.models.seq2seq import Seq2Seq, Seq2SeqConfig, moe_flops_budget, num_params
from xmoe.presets import get_mt_preset
from xmoe.moe import RoutingSummary
from xmoe.training.config import TrainConfig, apply_overrides
from xmoe.training.loop import TrainResult, autocast_context, moe_objective
from xmoe.training.metrics import routing_summary
from xmoe.training.runs import LoadedRun, load_run, train_task


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How to translate: beam search (``beam=1``: greedy) with length penalty ``score /
    length ** length_penalty``, at most ``max_len_a * source length + max_len_b`` tokens."""

    beam: int = 4
    length_penalty: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_tokens: int = 2048  # padded source tokens per translation batch

    def __post_init__(self) -> None:
        check_counts("decode", beam=self.beam, max_tokens=self.max_tokens)
        if not (self.length_penalty >= 0 and self.max_len_a >= 0 and self.max_len_b >= 0):
            raise UsageError("decode.length_penalty, decode.max_len_a and decode.max_len_b must be >= 0")


@dataclass(frozen=True, kw_only=True)
class MTRunConfig:
    """Everything a translation run needs; saved as config.json with each checkpoint.

    train.batch_size and train.seq_len are unused here: data.max_tokens sets the batch."""

    task: str = "mt"  # what config.json says the run is (xmoe.training.runs.task_of)
    preset: str
    model: Seq2SeqConfig
    data: TranslationDataConfig = field(default_factory=TranslationDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    label_smoothing: float = 0.1
    eval_bleu_sentences: int = 200  # validation sentences translated (greedy) at each evaluation

    def __post_init__(self) -> None:
        if self.task != "mt":
            raise UsageError(f"task={self.task!r}: a translation run config is task 'mt'")
        if self.data.max_len > self.model.max_len:
            raise UsageError(
                f"data.max_len={self.data.max_len} exceeds model.max_len={self.model.max_len} (the "
                f"positions the model has); lower data.max_len or raise model.max_len"
            )
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.eval_bleu_sentences, int) or self.eval_bleu_sentences < 0:
            raise UsageError(f"eval_bleu_sentences must be an integer >= 0, got {self.eval_bleu_sentences!r}")


# Per model size: the recipe's optimizer settings and a batch and vocabulary that fit the size.
# Base is the paper's (lr 5e-4, 512 fixed warm-up steps); smaller sizes warm up for 10% of their steps.
_RECIPES = {
    "base": dict(train=dict(lr=5e-4, warmup_steps=512, max_steps=20000, save_every=1000, eval_every=1000),
                 data=dict(vocab_size=32000, max_len=256, max_tokens=4096)),
    "cpu": dict(train=dict(lr=1e-3, max_steps=2000, save_every=500, eval_every=500),
                data=dict(vocab_size=8000, max_len=128, max_tokens=2048)),
    "debug": dict(train=dict(lr=3e-3, max_steps=200, save_every=100, eval_every=0, log_every=10),
                  data=dict(vocab_size=256, max_len=64, max_tokens=512)),
}


def mt_run_config(preset: str, *, overrides: dict[str, str] | None = None) -> MTRunConfig:
    """The run config of an MT preset with the translation recipe, then ``overrides``."""
    model = get_mt_preset(preset)
    recipe = _RECIPES[preset.split("-")[0]]
    train = TrainConfig(betas=(0.9, 0.98), weight_decay=0.0, schedule="inverse_sqrt", warmup_fraction=0.1,
                        **recipe["train"])
    cfg = MTRunConfig(preset=preset, model=model, data=TranslationDataConfig(**recipe["data"]), train=train)
    return apply_overrides(cfg, overrides or {})


# --- the task --------------------------------------------------------------------------------


def label_smoothed_loss(logits_BLV: Tensor, tgt_out_BL: Tensor, smoothing: float) -> Tensor:
    """Mean label-smoothed cross entropy over the real target tokens, in fp32."""
    V = logits_BLV.shape[-1]
    return F.cross_entropy(logits_BLV.float().reshape(-1, V), tgt_out_BL.reshape(-1), ignore_index=PAD_ID,
                           label_smoothing=smoothing)


class Translation:
    """The translation task, as xmoe.training.runs.train_task runs it: the class says how a run
    starts (config, data, model, vocabulary), an instance is the loop's task (batches, loss,
    evaluation)."""

    name = "mt"
    config_class = MTRunConfig
    default_preset = "cpu-xmoe-32x512"
    vocab_files = (SPM_FILE,)  # saved in the run folder; every checkpoint is bound to them
    path_fields = ("data.src", "data.tgt", "data.valid_src", "data.valid_tgt")  # saved absolute (see lm)
    # Beyond the training fields every task may change on a resume: decoding and evaluation only.
    also_resumable = ("decode.", "eval_bleu_sentences")
    config = staticmethod(mt_run_config)
    build_model = Seq2Seq
    load_vocab = staticmethod(load_subword_vocab)
    num_params = staticmethod(num_params)

    @staticmethod
    def prepare(cfg: MTRunConfig, run_dir, resume: bool, ranks: Ranks | None) -> TranslationData:
        """The subword vocabulary (trained on the training pairs, or the run's own on a resume)
        and the encoded pairs. Translation trains in one process."""
        return prepare_translation_data(cfg.data, run_dir, reuse_vocab=resume)

    @staticmethod
    def fit_vocab(cfg: MTRunConfig, data: TranslationData) -> MTRunConfig:
        vocab = data.vocab
        return dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vocab_size=vocab.vocab_size, pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id))

    @staticmethod
    def describe_data(cfg: MTRunConfig) -> str:
        return "the parallel files"

    def __init__(self, data: TranslationData, cfg: MTRunConfig) -> None:
        self.data, self.cfg = data, cfg
        self.batches = data.train_batches(max_tokens=cfg.data.max_tokens, seed=cfg.train.seed)

    def train_batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.batches.batch(index)

    def tokens(self, batch: tuple[Tensor, ...]) -> int:
        return int((batch[2] != PAD_ID).sum())

    def loss(self, model: Seq2Seq, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Any]]:
        """The loss of one micro-batch: label-smoothed cross entropy averaged over *this
        micro-batch's* real target tokens, plus the weighted MoE losses. The shared loop divides
        it by ``grad_accum`` and sums, so with ``grad_accum > 1`` a step averages micro-batches
        with equal weight, not tokens (fairseq instead normalises summed token losses by the
        step's total token count). Kept on purpose: one rule for LM and MT in the loop, and
        micro-batches are filled up to data.max_tokens, so their token counts are mostly close."""
        src_BS, tgt_in_BL, tgt_out_BL = batch
        out = model(src_BS, tgt_in_BL)
        ce = label_smoothed_loss(out.logits_BLV, tgt_out_BL, self.cfg.label_smoothing)
        return moe_objective(ce, out, self.cfg.train)

    def evaluate(self, model: Seq2Seq, ranks: Ranks) -> dict[str, Any]:
        """Validation loss and routing on every pair; BLEU/chrF++ of greedy translations of the
        first ``eval_bleu_sentences`` sentences. Translation trains in one process (train_mt
        takes no ``parallel``), so ``ranks`` is always a run of one."""
        assert ranks.world_size == 1, "translation is not trained on several ranks"
        cfg = self.cfg
        result = teacher_forced(model, self.data.valid, max_tokens=cfg.data.max_tokens,
                                precision=cfg.train.precision)
        n = cfg.eval_bleu_sentences
        if n:
            decode = dataclasses.replace(cfg.decode, beam=1)
            hyps = translate_lines(model, self.data.vocab, self.data.valid_src[:n], decode,
                                   precision=cfg.train.precision)
            scores = corpus_scores(hyps, self.data.valid_ref[:n])
            result.update(bleu=scores["bleu"], chrf=scores["chrf"])
        return result


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced(model: Seq2Seq, pairs: Pairs, *, max_tokens: int, precision: str = "auto") -> dict[str, Any]:
    """Token-weighted validation cross entropy (no smoothing) over real target tokens, and the
    routing of the real tokens of both sides: experts per token, MoE FLOPs per token (each MoE
    layer over its own side's tokens, summed over layers) and their ratio to the top-k model of
    equal parameters."""
    if not len(pairs):
        raise UsageError("evaluation got no sentence pairs (all filtered as over-long?)")
    model.eval()
    device = next(model.parameters()).device
    total, tokens, layers = 0.0, 0, [RoutingSummary() for _ in model.moe_layers()]
    for _, batch in eval_batches(pairs, max_tokens):
        src_BS, tgt_in_BL, tgt_out_BL = (t.to(device) for t in batch)
        with autocast_context(device, precision):
            out = model(src_BS, tgt_in_BL)
        n = int((tgt_out_BL != PAD_ID).sum())
        total += float(label_smoothed_loss(out.logits_BLV, tgt_out_BL, 0.0)) * n
        tokens += n
        for layer, stats in zip(layers, out.stats):
            layer.add(stats)
    result: dict[str, Any] = {"loss": total / tokens, "tokens": tokens}
    if model.cfg.moe is not None:
        flops = sum(layer.kept_pairs / max(layer.tokens, 1) for layer in layers) * model.cfg.moe.flops_per_pair
        result.update(routing_summary(layers, flops, moe_flops_budget(model.cfg)))
    return result


@torch.no_grad()
def translate_lines(model: Seq2Seq, vocab: SubwordVocab, lines: Sequence[str], decode: DecodeConfig, *,
                    precision: str = "auto") -> list[str]:
    """Translations of ``lines``, in order, batched by source length."""
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = [""] * len(lines)
    for index, src_BS in source_batches(vocab, lines, max_tokens=decode.max_tokens, max_len=model.cfg.max_len):
        with autocast_context(device, precision):
            ids = model.beam_search(src_BS.to(device), beam=decode.beam, length_penalty=decode.length_penalty,
                                    max_len_a=decode.max_len_a, max_len_b=decode.max_len_b)
        for i, hyp in zip(index.tolist(), ids):
            out[i] = vocab.decode(hyp)
    return out


def corpus_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU's corpus BLEU and chrF++ with their signatures."""
    with needs_extra("mt", "BLEU and chrF++"):
        from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise UsageError(f"{len(hyps)} translations for {len(refs)} references; the files must be line-aligned")
    bleu, chrf = BLEU(), CHRF(word_order=2)
    b, c = bleu.corpus_score(list(hyps), [list(refs)]), chrf.corpus_score(list(hyps), [list(refs)])
    return {"bleu": b.score, "bleu_signature": str(bleu.get_signature()), "bleu_text": str(b),
            "chrf": c.score, "chrf_signature": str(chrf.get_signature()), "chrf_text": str(c)}


def evaluate_mt(loaded: LoadedRun, src_lines: Sequence[str], ref_lines: Sequence[str], *,
                decode: DecodeConfig | None = None) -> tuple[dict[str, Any], list[str]]:
    """Translate ``src_lines``, score against ``ref_lines`` (BLEU, chrF++), and measure the
    routing on the (source, reference) pairs. Returns the summary and the translations."""
    if len(src_lines) != len(ref_lines):
        raise UsageError(f"--src has {len(src_lines)} lines, --ref has {len(ref_lines)}; they must be line-aligned")
    decode = decode or loaded.cfg.decode
    precision = loaded.cfg.train.precision
    hyps = translate_lines(loaded.model, loaded.vocab, src_lines, decode, precision=precision)
    summary = {"sentences": len(hyps), "beam": decode.beam, **corpus_scores(hyps, ref_lines)}
    pairs = encode_pairs(loaded.vocab, src_lines, ref_lines, max_len=loaded.model.cfg.max_len)
    summary.update(teacher_forced(loaded.model, pairs, max_tokens=decode.max_tokens, precision=precision))
    return summary, hyps


# --- entry points ----------------------------------------------------------------------------


def train_mt(cfg: MTRunConfig, run_dir: str | os.PathLike, *, resume: bool = False,
             progress: bool = True) -> TrainResult:
    """Train (or with ``resume``, continue) the translation model ``cfg`` in ``run_dir``; see
    xmoe.training.runs.train_task."""
    check_extra("mt", "translation")  # before the run folder is made, not at the first BLEU
    return train_task(Translation, cfg, run_dir, resume=resume, progress=progress)


def load_mt(path: str | os.PathLike, *, device: str = "auto") -> LoadedRun:
    """A trained translation model, its config, run folder and subword vocabulary, from a run or
    checkpoint folder."""
    return load_run(Translation, path, device=device)


def translate(loaded: LoadedRun, lines: Sequence[str], *, decode: DecodeConfig | None = None) -> list[str]:
    return translate_lines(loaded.model, loaded.vocab, lines, decode or loaded.cfg.decode,
                           precision=loaded.cfg.train.precision)


__all__ = [
    "DecodeConfig", "MTRunConfig", "Translation", "corpus_scores", "evaluate_mt", "label_smoothed_loss",
    "load_mt", "mt_run_config", "teacher_forced", "train_mt", "translate", "translate_lines",
]
