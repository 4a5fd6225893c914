"""Router sharpening options of the run config (beyond the paper, off by default):
``train.router_lr_mult`` scales the routers' learning rate only, ``train.entropy_loss_coef``
adds the mean router entropy to the loss. Checked through real training runs."""

from __future__ import annotations

import pytest
import torch

from xmoe.data import DataConfig
from xmoe.training import TrainConfig, read_metrics
from xmoe.tasks.lm import lm_run_config, load_lm, train_lm
from xmoe.training.loop import build_optimizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "the quick brown fox jumps over the lazy dog while experts route tokens".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=gen)) for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def config(corpus, cache, **train):
    train = {"batch_size": 4, "seq_len": 32, "eval_every": 0, "save_every": 0, "log_every": 1, "eval_batches": 1,
             **train}
    return lm_run_config("debug-xmoe", train=TrainConfig(**train),
                         data=DataConfig(path=str(corpus), vocab_size=300, cache_dir=str(cache)))


def weights_after(corpus, run, **train) -> dict[str, torch.Tensor]:
    train = {"max_steps": 1, "lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, **train}
    train_lm(config(corpus, run.parent / "cache", **train), run, progress=False)
    return load_lm(run).model.state_dict()


def test_router_lr_mult_scales_the_router_update_and_nothing_else(corpus, tmp_path) -> None:
    """Adam's first update is -lr * g / (|g| + eps), linear in the learning rate: with the same
    gradients, router weights after one step at multipliers 1, 2, 3 are equally spaced, by about
    lr where the gradient is not tiny; every other weight is the same in the three runs."""
    w1, w2, w3 = (weights_after(corpus, tmp_path / f"m{m}", router_lr_mult=float(m)) for m in (1, 2, 3))
    routers = [name for name in w1 if name.endswith("router.weight")]
    assert len(routers) == 1  # debug-xmoe: one MoE layer
    for name in w1:
        if name in routers:
            step = w2[name] - w1[name]
            torch.testing.assert_close(w3[name] - w2[name], step, rtol=0, atol=1e-6)
            assert 0.5e-3 < step.abs().max() <= 1e-3 * (1 + 1e-3)  # about lr, never more
        else:
            assert torch.equal(w1[name], w2[name]) and torch.equal(w2[name], w3[name]), name


def test_router_lr_mult_of_one_keeps_the_papers_two_param_groups() -> None:
    """Checkpoints of runs without the option hold two groups; a resume must find two."""
    from xmoe.models.gpt import GPT
    from xmoe.presets import get_preset

    model = GPT(get_preset("debug-xmoe"))
    assert len(build_optimizer(model, TrainConfig()).param_groups) == 2
    groups = build_optimizer(model, TrainConfig(router_lr_mult=4.0)).param_groups
    router_params = {id(p) for n, p in model.named_parameters() if n.endswith("router.weight")}
    assert [g.get("lr_mult", 1.0) for g in groups] == [1.0, 1.0, 4.0]
    assert {id(p) for p in groups[2]["params"]} == router_params


def test_entropy_loss_coef_makes_the_router_sharper(corpus, tmp_path) -> None:
    """Trained on the same batches, a run with the entropy loss ends with a lower mean router
    entropy than one without; its logged loss includes coef * entropy."""
    for name, coef in (("base", 0.0), ("sharp", 1.0)):
        cfg = config(corpus, tmp_path / "cache", max_steps=8, lr=3e-3, entropy_loss_coef=coef)
        train_lm(cfg, tmp_path / name, progress=False)
    last_base, last_sharp = ([r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "router_entropy" in r][-1]
                             for name in ("base", "sharp"))
    assert last_sharp["router_entropy"] < last_base["router_entropy"] - 0.05
    expected = last_sharp["ce"] + 0.01 * last_sharp["aux_loss"] + 1.0 * last_sharp["router_entropy"]
    assert last_sharp["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("field, value", [("router_lr_mult", 0.0), ("router_lr_mult", float("inf")),
                                          ("entropy_loss_coef", -0.1)])
def test_bad_sharpening_settings_are_named(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"train.{field}"):
        TrainConfig(**{field: value})
