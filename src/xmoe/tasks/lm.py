"""Language modelling: the task a GPT trains on (next-token cross entropy on a text corpus
through the run's own BPE tokenizer), its run config and recipe, its evaluation (perplexity
with the routing of every MoE layer), and the entry points the CLI wires up (train, load,
evaluate).

Loss: the model's next-token cross entropy (GPT computes it in fp32), with the MoE loss terms
of the recipe (xmoe.training.loop.moe_objective: the paper's balancing loss; the z-loss and the
router entropy where those options are on).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from xmoe.data import TOKENIZER_FILE, DataConfig, LMData, ValBatches, load_eval_tokens, load_tokenizer, prepare_lm_data
from xmoe.distributed import Ranks, SingleProcess
from xmoe.errors import UsageError
from xmoe.models.config import GPTConfig
from xmoe.models.counts import flops_breakdown
from xmoe.models.gpt import GPT, moe_flops_per_token, num_params
from xmoe.moe import RoutingSummary
from xmoe.presets import get_preset
from xmoe.training.config import TrainConfig, with_overrides, to_dict
from xmoe.training.loop import TrainResult, autocast_context, moe_objective
from xmoe.training.metrics import perplexity, routing_summary
from xmoe.training.runs import LoadedRun, load_run, train_task


@dataclass(frozen=True, kw_only=True)
class LMRunConfig:
    """Everything a language-model run needs; saved as config.json with each checkpoint."""

    task: str = "lm"  # what config.json says the run is (xmoe.training.runs.task_of)
    preset: str
    model: GPTConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.task != "lm":
            raise UsageError(f"task={self.task!r}: a language-model run config is task 'lm'")
        if self.train.seq_len > self.model.block_size:
            raise UsageError(
                f"train.seq_len={self.train.seq_len} exceeds model.block_size={self.model.block_size}; "
                f"lower train.seq_len or raise model.block_size"
            )


def lm_run_config(preset: str, *, vocab_size: int | None = None, overrides: dict[str, str] | None = None,
                  **sections: Any) -> LMRunConfig:
    """The run config of a GPT preset, with ``sections`` (data=..., train=...) and overrides.

    Without a train section, ``train.seq_len`` defaults to at most the preset's context length.
    """
    model = get_preset(preset, vocab_size=vocab_size)
    train = sections.pop("train", None) or TrainConfig(seq_len=min(TrainConfig.seq_len, model.block_size))
    data = {"preset": preset, "model": to_dict(model), "data": to_dict(sections.pop("data", DataConfig())),
            "train": to_dict(train)}
    if sections:
        raise TypeError(f"unknown config sections: {', '.join(sections)}")
    return with_overrides(LMRunConfig, data, overrides or {})


class LanguageModelling:
    """The language-modelling task, as xmoe.training.runs.train_task runs it: the class says how a
    run starts (config, data, model, vocabulary), an instance is the loop's task (batches, loss,
    evaluation)."""

    name = "lm"
    config_class = LMRunConfig
    default_preset = "cpu-xmoe-64x128"
    vocab_files = (TOKENIZER_FILE,)  # saved in the run folder; every checkpoint is bound to them
    path_fields = ("data.path",)  # saved absolute: eval, generate and --resume then work from any folder
    also_resumable: tuple[str, ...] = ()  # beyond xmoe.training.runs.RESUMABLE_TRAIN_FIELDS
    config = staticmethod(lm_run_config)
    build_model = GPT
    load_vocab = staticmethod(load_tokenizer)
    num_params = staticmethod(num_params)

    @staticmethod
    def prepare(cfg: LMRunConfig, run_dir: Path, resume: bool, ranks: Ranks | None) -> LMData:
        """Tokenizer and token cache, written by one rank; the others wait, then reuse them. A new
        run is told when it reuses a tokenizer an earlier run left (its checkpoint deleted, or a
        start killed before its first save)."""
        if not resume and (Path(run_dir) / TOKENIZER_FILE).is_file() and (ranks is None or ranks.is_main):
            warnings.warn(f"{Path(run_dir) / TOKENIZER_FILE} is left from an earlier run; this new run trains with "
                          f"it, not with a tokenizer of its own data (delete it first to train one)", stacklevel=2)
        if ranks is None:
            return prepare_lm_data(cfg.data, run_dir)
        data = prepare_lm_data(cfg.data, run_dir) if ranks.is_main else None
        ranks.barrier()
        return data if data is not None else prepare_lm_data(cfg.data, run_dir)

    @staticmethod
    def fit_vocab(cfg: LMRunConfig, data: LMData) -> LMRunConfig:
        """The model's vocabulary is the tokenizer's (data.vocab_size is what BPE was asked for; a
        small corpus can give fewer tokens)."""
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))

    @staticmethod
    def describe_data(cfg: LMRunConfig) -> str:
        return f"the text behind data.path={cfg.data.path!r} (another file, or another Python version for the default corpus)"

    def __init__(self, data: LMData, cfg: LMRunConfig) -> None:
        t = cfg.train
        self.data, self.train_cfg = data, t
        self.batches = data.train_batches(batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)

    def train_batch(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches.batch(index)

    def tokens(self, batch: tuple[Tensor, ...]) -> int:
        return batch[0].numel()

    def loss(self, model: GPT, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's next-token cross entropy (fp32) with the MoE loss terms."""
        out = model(*batch)
        return moe_objective(out.loss, out, self.train_cfg)

    def evaluate(self, model: GPT, ranks: Ranks) -> dict:
        """The validation batches, each rank evaluating its share (``evaluate_lm``)."""
        t = self.train_cfg
        batches = self.data.val_batches(batch_size=t.batch_size, seq_len=t.seq_len, max_batches=t.eval_batches)
        return evaluate_lm(model, batches, precision=t.precision, ranks=ranks).to_dict()


@dataclass
class LMEval:
    loss: float
    tokens: int
    layers: list[RoutingSummary] = field(default_factory=list)
    moe_flops_per_token: float = 0.0
    topk_moe_flops_per_token: float = 0.0

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                **routing_summary(self.layers, self.moe_flops_per_token, self.topk_moe_flops_per_token)}


@torch.no_grad()
def evaluate_lm(model: GPT, batches: Iterable[tuple[Tensor, Tensor]], *, precision: str = "auto",
                ranks: Ranks | None = None) -> LMEval:
    """Token-weighted mean loss and routing summary over ``batches`` (model put in eval mode).

    ``ranks``: this process is one of the W ranks of a distributed run (xmoe.distributed.Parallel),
    each holding the same ``batches``. Rank r evaluates batches r, r + W, r + 2W, ...; the sums
    are added over the ranks in one all_reduce, so every rank returns the evaluation of all the
    batches. Every rank runs the same number of forwards, because FSDP all-gathers and expert
    parallelism exchanges tokens inside each one: a rank with a batch fewer runs the first batch
    once more and discards its numbers."""
    ranks = ranks or SingleProcess()
    model.eval()
    device = next(model.parameters()).device

    def forward(x_BL: Tensor, y_BL: Tensor):
        with autocast_context(device, precision):
            return model(x_BL.to(device), y_BL.to(device))

    total_loss, total_tokens, first, seen = 0.0, 0, None, 0
    layers = [RoutingSummary() for _ in model.moe_layers()]
    for index, (x_BL, y_BL) in enumerate(batches):
        if first is None:
            first = x_BL, y_BL
        seen += 1
        if index % ranks.world_size != ranks.rank:
            continue
        out = forward(x_BL, y_BL)
        total_loss += float(out.loss) * y_BL.numel()
        total_tokens += y_BL.numel()
        for layer, s in zip(layers, out.stats, strict=True):
            layer.add(s)
    if first is None:
        raise UsageError("evaluation got no batches: the evaluation text is shorter than one sequence")
    mine = len(range(ranks.rank, seen, ranks.world_size))
    for _ in range(math.ceil(seen / ranks.world_size) - mine):
        forward(*first)  # for the collectives inside; its numbers are not this rank's to count

    experts = [layer.cfg.num_experts for layer in model.moe_layers()]
    total_loss, total_tokens, layers = _sum_over_ranks(ranks, total_loss, total_tokens, layers, experts)
    result = LMEval(loss=total_loss / total_tokens, tokens=total_tokens, layers=layers)
    if model.cfg.moe is not None and result.layers:
        result.moe_flops_per_token = moe_flops_per_token(model.cfg, [l.kept_pairs / l.tokens for l in result.layers])
        result.topk_moe_flops_per_token = flops_breakdown(model.cfg).experts
    return result


def _sum_over_ranks(ranks: Ranks, loss_sum: float, tokens: int, layers: list[RoutingSummary],
                    experts: list[int]) -> tuple[float, int, list[RoutingSummary]]:
    """The world's sums of this rank's token-weighted loss, tokens and routing summaries (MoE
    layers of ``experts`` experts each), in one all_reduce of a flat float64 tensor."""
    parts = [torch.tensor([loss_sum, tokens], dtype=torch.float64)]
    parts += [layer.to_tensor(e) for layer, e in zip(layers, experts)]
    summed = ranks.sum_tensor(torch.cat(parts)).split([len(part) for part in parts])
    loss_sum, tokens = summed[0].tolist()
    return loss_sum, int(tokens), [RoutingSummary.from_tensor(flat, e) for flat, e in zip(summed[1:], experts)]


def train_lm(cfg: LMRunConfig, run_dir: str | os.PathLike, *, resume: bool = False,
             progress: bool = True, ranks: Ranks | None = None) -> TrainResult:
    """Train (or with ``resume``, continue) the language model ``cfg`` in ``run_dir``; see
    xmoe.training.runs.train_task. ``ranks``: this process is one rank of a distributed run."""
    return train_task(LanguageModelling, cfg, run_dir, resume=resume, progress=progress, ranks=ranks)


def load_lm(path: str | os.PathLike, *, device: str = "auto") -> LoadedRun:
    """A trained language model, its config, run folder and tokenizer (``.vocab``), from a run or
    checkpoint folder."""
    return load_run(LanguageModelling, path, device=device)


def eval_batches(loaded: LoadedRun, data_path: str | None, *, batch_size: int | None = None,
                 max_batches: int | None = None, split: str = "val") -> ValBatches:
    """Batches of the run's validation split (data_path None; ``split="test"``: its held-out
    test split, see DataConfig.test_fraction) or of new text through the run's tokenizer."""
    t = loaded.cfg.train
    batch_size = batch_size or t.batch_size
    if data_path is None:
        data = prepare_lm_data(loaded.cfg.data, loaded.run_dir)
        return data.val_batches(batch_size=batch_size, seq_len=t.seq_len, max_batches=max_batches, split=split)
    tokens = load_eval_tokens(data_path, loaded.run_dir, cache_dir=loaded.cfg.data.cache_dir)
    return ValBatches(tokens=tokens, batch_size=batch_size, seq_len=t.seq_len, max_batches=max_batches,
                      name=repr(data_path))


__all__ = ["LMEval", "LMRunConfig", "LanguageModelling", "eval_batches", "evaluate_lm", "lm_run_config", "load_lm",
           "train_lm"]
