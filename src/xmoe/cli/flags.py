"""What the command table (xmoe.cli.main) needs beyond signatures: a parser whose heavy flags
are added when its command is used, and one ``--section.field=VALUE`` flag per field of a run
config (`train`, `train-mt`, `study`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose heavier arguments are added only when that command is used.

    ``xmoe --help`` and ``xmoe presets`` must not import torch: the choices of `xmoe study`, the
    flags of `xmoe bench layer` and the run config's fields live in modules that do. Such a
    command registers ``later(add)``; ``add(parser)`` runs before the command's arguments are
    parsed or its help is printed, so only the command typed pays for its imports."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._later: list[Callable[[argparse.ArgumentParser], None]] = []

    def later(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._later.append(add)

    def complete(self) -> CommandParser:
        """Add the deferred arguments (once)."""
        while self._later:
            self._later.pop(0)(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(CommandParser, self.complete()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(CommandParser, self.complete()).format_help()


def run_config(task, preset: str | None, overrides: dict[str, str], *, out: str, resume: bool):
    """The run config of a training command of ``task`` (a task class of xmoe.tasks: LanguageModelling, Translation): --preset
    (None: the task's default, or with --resume the run's), its config flags, --resume."""
    from xmoe.training.runs import run_config

    return run_config(task, preset, overrides, resume_from=out if resume else None)


def add_config_flags(p: argparse.ArgumentParser, cls: type, *, renamed: dict[str, str] | None = None) -> None:
    """A ``--section.field VALUE`` option for every field of the run config ``cls`` (the preset's
    value unless given); ``renamed``: old flags (without --) that now fail naming their new key."""
    from xmoe.training.config import config_keys

    group = p.add_argument_group("run config", "every field of the preset's run config; values as JSON "
                                 "(a tuple is a list, [0.9, 0.95]; None is null)")
    p.usage = "%(prog)s [options] [--SECTION.FIELD=VALUE ...]"
    keys = config_keys(cls)
    for key in keys:
        group.add_argument(f"--{key}", dest=key, metavar="VALUE", default=argparse.SUPPRESS)
    p.set_defaults(config_class=cls, config_keys=keys, renamed=renamed or {})


def config_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The run config flags given on the command line, by dotted key."""
    return {key: getattr(args, key) for key in args.config_keys if hasattr(args, key)}
