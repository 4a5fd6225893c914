"""Running `xmoe` in-process: the command's stdout, and the flags of a tiny training run."""

from __future__ import annotations

from xmoe.cli.main import main

# `xmoe train` flags of a run that takes seconds on CPU (add --data.path and --data.cache_dir)
TINY_TRAIN = ["--train.max_steps=3", "--train.batch_size=4", "--train.seq_len=32", "--train.eval_every=0",
              "--train.eval_batches=2", "--train.log_every=1", "--data.vocab_size=300"]


def run_cli(argv: list[str], capsys) -> str:
    """What ``xmoe ARGV`` prints on stdout."""
    main(argv)
    return capsys.readouterr().out
