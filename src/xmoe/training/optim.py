"""Optimizer and learning-rate schedule of the XMoE recipe (docs/method.md).

AdamW with weight decay on matrices only (not on norms, biases or embeddings, as GPT-2 setups
do); linear warm-up, then cosine decay to ``lr * min_lr_ratio`` (LM), inverse square root
(translation, Vaswani et al. 2017), or constant.

``router_lr_mult`` (beyond the paper, off at 1) puts the routers' gates in a group of their own
whose learning rate is ``lr_mult`` times the schedule's; the loop sets ``lr * lr_mult`` per group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmoe.moe import Router

from .config import TrainConfig


BIASES = {"bias", "b1", "b2", "b3"}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay, router = [], [], []
    separate_router = cfg.router_lr_mult != 1.0  # else the paper's two groups, as older checkpoints hold
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # Embeddings, biases (expert biases are [E, F]: 2-D, still biases) and norm gains
            # are not decayed.
            is_embedding = isinstance(module, nn.Embedding)
            if separate_router and isinstance(module, Router):
                router.append(param)
            else:
                (no_decay if is_embedding or param.ndim < 2 or name in BIASES else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if router:
        groups.append({"params": router, "weight_decay": cfg.weight_decay, "lr_mult": cfg.router_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based). Warm-up lasts ``warmup_steps``
    when set (the translation recipe's 512), else ``warmup_fraction`` of the schedule's span,
    ``schedule_steps`` (default ``max_steps``); the cosine decays over that span, then stays at
    its floor."""
    span = cfg.schedule_steps or cfg.max_steps
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = max(1, round(cfg.warmup_fraction * span)) if cfg.warmup_fraction > 0 else 0
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / (step + 1))
    progress = (step - warmup) / max(1, span - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
