"""xmoe.tasks: one class per task, each the whole protocol of its runs: its run config and
recipe, its data and vocabulary, its model, its loss and its evaluation.

    LanguageModelling   (xmoe.tasks.lm)   a GPT on a text corpus: xmoe train
    Translation         (xmoe.tasks.mt)   a Seq2Seq model on parallel text: xmoe train-mt

xmoe.training.runs.train_task(Task, cfg, run_dir) runs either through the one training loop. A
run's config.json names its task ("task": "lm" or "mt"; xmoe.training.runs.task_of reads it).
Nothing is imported here: a language-model command loads nothing of translation.
"""
