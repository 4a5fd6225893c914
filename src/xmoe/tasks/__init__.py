"""xmoe.tasks: one class per task, each the whole protocol of its runs: its run config and
recipe, its data and vocabulary, its model, its loss and its evaluation.

    LanguageModelling   (xmoe.tasks.lm)   a GPT on a text corpus: xmoe train
    Translation         (xmoe.tasks.mt)   a Seq2Seq model on parallel text: xmoe train-mt

xmoe.training.runs.train_task(Task, cfg, run_dir) runs either through the one training loop. A
run's config.json names its task ("task": "lm" or "mt"; xmoe.training.runs.task_of reads it);
``task_class`` turns the name into the class.

The task modules are imported on demand: a language-model command loads nothing of translation.
"""

from __future__ import annotations

import importlib

_MODULES = {"lm": ("xmoe.tasks.lm", "LanguageModelling"), "mt": ("xmoe.tasks.mt", "Translation")}


def task_class(name: str) -> type:
    """The task class of ``name`` ("lm" or "mt")."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(_MODULES)}")
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module), cls)


__all__ = ["task_class"]
