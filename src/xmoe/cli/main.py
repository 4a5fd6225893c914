"""`xmoe <command>`: the command table, and how a command line becomes a call. Each command is a
typed function (xmoe.cli.lm, .mt, .hf, .convert, .study) whose signature is its flags
(add_signature); the work lives in the library. What `xmoe --help` shows after the commands is
EXAMPLES.

`train`, `train-mt` and `study` take every field of the run config as a dotted flag, read by
xmoe.training.config as its field's type, and nothing else sets those fields: one spelling per
setting. A mistake the user can fix (xmoe.UsageError, a checkpoint or file that is not there) is
one line and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from xmoe.cli import convert, hf, lm, mt, study
from xmoe.errors import CheckpointError, UsageError, is_disk_full


@dataclass(frozen=True)
class Command:
    """One `xmoe` command: ``run``, whose signature is its flags, and what a signature cannot
    say: ``config``, the run config class (``module:Class``, imported when the command is used)
    that its --section.field=VALUE flags set (passed as ``config``); ``choices`` read when the
    command is used (their modules import torch); ``renamed``, old flags that name their new
    spelling. A benchmark defines its own flags (``flags``), and its ``run`` takes the parsed
    namespace."""

    run: Callable
    config: str | None = None
    choices: dict[str, Callable[[], tuple[str, ...]]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    flags: Callable[[argparse.ArgumentParser], None] | None = None
    help: str | None = None
    description: str | None = None


def _bench(kind: str, help: str) -> Command:
    """`xmoe bench KIND`: the benchmark module (xmoe.bench.KIND) defines its flags and reads them."""
    module = f"xmoe.bench.{kind}"
    return Command(run=lambda args: importlib.import_module(module).run(args), help=help,
                   flags=lambda p: importlib.import_module(module).add_arguments(p))


# Parameters the runner passes itself: the run config's flags, and the command line (to relaunch
# it under torchrun, or to name the command that continues a stopped demo).
SUPPLIED = ("config", "command_line")
LM_RUN, MT_RUN = "xmoe.tasks.lm:LMRunConfig", "xmoe.tasks.mt:MTRunConfig"

COMMANDS: dict[str, Command] = {
    "demo": Command(lm.demo),
    "train": Command(lm.train, config=LM_RUN, renamed={"data": "data.path"}),
    "eval": Command(lm.evaluate),
    "sweep-threshold": Command(lm.sweep_threshold),
    "generate": Command(lm.generate),
    "report": Command(lm.report),
    "convert": Command(convert.convert, choices={"partition": convert.partitions}, description=convert.__doc__),
    "export-hf": Command(hf.export_hf),
    "lm-eval": Command(hf.lm_eval),
    "study": Command(study.study, config=LM_RUN, choices={"name": study.names, "scale": study.scales},
                     description=study.__doc__),
    "presets": Command(lm.presets),
    "train-mt": Command(mt.train_mt, config=MT_RUN, renamed={
        "src": "data.src", "tgt": "data.tgt", "valid-src": "data.valid_src", "valid-tgt": "data.valid_tgt"}),
    "translate": Command(mt.translate),
    "eval-mt": Command(mt.eval_mt),
    "bench layer": _bench("layer", "MoE layer speed against the speed limit and baselines"),
    "bench decode": _bench("decode", "decode speed (a few tokens per call) against the active-weights floor"),
}


EXAMPLES = """examples:
    xmoe demo                                   the main job: XMoE and top-k trained, compared (CPU, minutes)
    xmoe train --preset cpu-xmoe-64x128 --out runs/a [--data.path=PATH] [--resume] [--train.max_steps=200 ...]
    xmoe train --nproc 2 --ep-size 2 ...        the same on 2 processes, experts split over them (torchrun)
    xmoe eval --checkpoint runs/a [--data PATH] [--threshold 0.7] [--capacity]
    xmoe sweep-threshold --checkpoint runs/a [--thresholds 0.5 0.7 0.9 1.0]
    xmoe generate --checkpoint runs/a --prompt "def "
    xmoe report runs/a
    xmoe convert --checkpoint runs/dense --experts 8 --out runs/dense-x8 [--partition clustered]
    xmoe export-hf --checkpoint runs/a --out hf/a   a Hugging Face folder (AutoModelForCausalLM)
    xmoe lm-eval --checkpoint hf/a --tasks hellaswag   lm-evaluation-harness tasks at each threshold
    xmoe presets
    xmoe train-mt / translate / eval-mt         translation
    xmoe bench layer / decode

`train`, `train-mt` and `study` take every field of the run config as a dotted flag
(--train.max_steps=200, --model.moe.threshold=0.8; `xmoe train --help` lists them).
"""

def build_parser() -> argparse.ArgumentParser:
    """The `xmoe` parser, from COMMANDS. Building it imports nothing heavy: a command's run-config
    flags, choices and benchmark flags are added when that command is used (CommandParser)."""
    parser = argparse.ArgumentParser(prog="xmoe", description="XMoE: sparse MoE with a threshold router",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = commands.add_parser(group, help="benchmarks").add_subparsers(
                dest=group, required=True, metavar="KIND", parser_class=CommandParser)
        p = (groups[group] if group else commands).add_parser(
            leaf, help=command.help or summary(command.run), description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=command.config is None)
        if command.flags is None:
            add_signature(p, command.run, skip=SUPPLIED)
        p.later = functools.partial(_add_deferred, command=command)
        p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
        p.set_defaults(entry=command)
    return parser


def _add_deferred(p: argparse.ArgumentParser, command: Command) -> None:
    """The flags and choices that come from modules importing torch."""
    if command.flags is not None:
        command.flags(p)
    for action in p._actions:
        if action.dest in command.choices:
            action.choices = command.choices[action.dest]()
    if command.config is not None:
        module, _, name = command.config.partition(":")
        add_config_flags(p, getattr(importlib.import_module(module), name), renamed=command.renamed)


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose heavier arguments are added only when that command is used.

    ``xmoe --help`` and ``xmoe presets`` must not import torch: the choices of `xmoe study`, the
    flags of `xmoe bench layer` and the run config's fields live in modules that do. Such a
    command's parser holds ``later = add``; ``add(parser)`` runs before the command's arguments
    are parsed or its help is printed, so only the command typed pays for its imports."""

    later: Callable[[argparse.ArgumentParser], None] | None = None

    def complete(self) -> CommandParser:
        """Add the deferred arguments (once)."""
        add, self.later = self.later, None
        if add is not None:
            add(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(CommandParser, self.complete()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(CommandParser, self.complete()).format_help()


def add_signature(parser: argparse.ArgumentParser, function: Callable, *, skip: tuple[str, ...] = ()) -> None:
    """Add a flag to ``parser`` for every parameter of ``function`` but those named in ``skip``.

    The flags are read from the signature and the docstring, as LitGPT's CLI reads them through
    jsonargparse, but spelled the way `xmoe` has always spelled them (``--max-new-tokens``,
    ``--thresholds 0.5 0.7``, ``--resume`` without a value), which jsonargparse cannot do:

        def generate(*, checkpoint: str, prompt: str, max_new_tokens: int = 100, top_k: int | None = None):
            '''Sample text from a checkpoint.

            Args:
                checkpoint: run folder, Hugging Face folder or Hub id ORG/NAME
                max_new_tokens: tokens to generate
            '''

    becomes ``--checkpoint`` (required), ``--prompt`` (required), ``--max-new-tokens`` (int,
    100) and ``--top-k`` (int or none). The rules: a positional-only parameter is a positional
    argument; a keyword without a default is a required flag; ``bool`` is a switch (default
    False); ``list[X]`` takes one or more values; ``X | None`` is ``X`` or absent;
    ``Literal[...]`` lists its choices; the help is the parameter's line under "Args:"."""
    hints = typing.get_type_hints(function)
    helps = parameter_help(function)
    for name, param in inspect.signature(function).parameters.items():
        if name in skip:
            continue
        kwargs = _argument(hints[name], param.default)
        kwargs["help"] = helps.get(name)
        if param.kind is param.POSITIONAL_ONLY:
            parser.add_argument(name, **{k: v for k, v in kwargs.items() if k != "default" or v is not None})
        else:
            parser.add_argument("--" + name.replace("_", "-"), dest=name,
                                required=param.default is inspect.Parameter.empty, **kwargs)


def _argument(hint, default) -> dict:
    """argparse keywords for a parameter of type ``hint`` with ``default``."""
    default = None if default is inspect.Parameter.empty else default
    optional = _without_none(hint)
    if optional is bool:
        return {"action": "store_true", "default": bool(default)}
    if typing.get_origin(optional) is list:
        (item,) = typing.get_args(optional)
        return {"type": item, "nargs": "+", "default": default}
    if typing.get_origin(optional) is typing.Literal:
        return {"choices": typing.get_args(optional), "default": default}
    return {"type": optional, "default": default}


def _without_none(hint):
    """``X`` for ``X | None`` (or Optional[X]), else ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def parameter_help(function: Callable) -> dict[str, str]:
    """{parameter: its help} from the "Args:" section of ``function``'s docstring, one entry
    per ``name: text`` line, continued on more deeply indented lines."""
    doc = inspect.getdoc(function) or ""
    if "Args:" not in doc:
        return {}
    helps: dict[str, str] = {}
    name = None
    for line in doc.split("Args:", 1)[1].splitlines()[1:]:
        entry = re.match(r"^ {4}(\w+): (.*)$", line)
        if entry:
            name, helps[entry[1]] = entry[1], entry[2]
        elif line.startswith(" " * 5) and name:
            helps[name] += " " + line.strip()
        elif line.strip():
            break
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def summary(function: Callable) -> str:
    """The first line of ``function``'s docstring: the command's help in `xmoe --help`."""
    return (inspect.getdoc(function) or "").partition("\n")[0].rstrip(".")


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


def _call(command: Command, args: argparse.Namespace, argv: list[str]) -> None:
    """Run ``command`` with the values of its parameters in ``args``."""
    if command.flags is not None:
        return command.run(args)
    supplied = {"config": lambda: config_overrides(args), "command_line": lambda: argv}
    positional, keywords = [], {}
    for name, param in inspect.signature(command.run).parameters.items():
        value = supplied[name]() if name in supplied else getattr(args, name)
        if param.kind is param.POSITIONAL_ONLY:
            positional.append(value)
        else:
            keywords[name] = value
    command.run(*positional, **keywords)


def _diverged_checkpoint(path: str, err: FloatingPointError) -> str:
    """What a NaN or inf met while using a checkpoint means: its weights diverged in training."""
    from xmoe.training import CheckpointError, checkpoint_dir
    from xmoe.training.checkpoint import read_state

    try:
        at = f" (checkpoint at step {read_state(checkpoint_dir(path))['step']})"
    except CheckpointError:
        at = ""
    cause = str(err).split(",")[0].split(";")[0]
    return (f"the model in {path} computes NaN or inf ({cause}): its weights diverged during training{at}; "
            f"train it again with a lower train.lr")


THREADS_HELP = ("torch CPU threads (default: torch's, one per core). On a machine shared with other jobs, "
                "use 1: threads otherwise wait for each other while another job holds a core "
                "(measured in benchmarks/README.md)")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _reject(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """Arguments no option took: a renamed flag names its new spelling, a mistyped config key
    its closest real ones."""
    keys = [arg[2:].partition("=")[0] for arg in rest if arg.startswith("--")]
    for key in keys:
        if key in getattr(args, "renamed", {}):
            new = args.renamed[key]
            raise UsageError(f"--{key} is now --{new}: write --{new}=VALUE")
    if getattr(args, "config_class", None) is not None:
        from xmoe.training.config import check_config_keys

        check_config_keys(args.config_class, keys)
    parser.error(f"unrecognized arguments: {' '.join(rest)}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    with warnings.catch_warnings():  # puts showwarning back when main returns
        # Warnings are messages to the user here: one line each, without the source line.
        warnings.showwarning = lambda message, *_, **__: print(f"xmoe {args.command}: warning: {message}",
                                                               file=sys.stderr)
        _run(parser, args, rest, argv)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str], argv: list[str]) -> None:
    """Run the command; the errors a user can fix become one line and exit status 2."""
    try:
        _set_threads(args.threads)
        if rest:
            _reject(parser, args, rest)
        _call(args.entry, args, argv)
    except FloatingPointError as err:
        if getattr(args, "checkpoint", None) is not None:  # training says which step diverged itself
            err = _diverged_checkpoint(args.checkpoint, err)
        print(f"xmoe {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `xmoe presets | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)
    except OSError as err:
        if isinstance(err, (FileNotFoundError, FileExistsError)):
            _user_error(args, err)
        if not is_disk_full(err):
            raise
        _user_error(args, f"no space left (a full disk, a quota or a file-size limit): {err}")
    except KeyboardInterrupt as err:  # outside training (which saves and exits itself): nothing to save
        from xmoe.training.stopping import exit_code, signal_name

        signum = getattr(err, "signum", None)
        print(f"\nxmoe {args.command}: {signal_name(signum)}", file=sys.stderr)
        sys.exit(exit_code(signum))
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        _user_error(args, err)


def _user_error(args: argparse.Namespace, message) -> None:
    print(f"xmoe {args.command}: error: {message}", file=sys.stderr)
    sys.exit(2)


# Errors a user can fix that are defined beside the code raising them, by module: a module not
# imported by the command raised none, so the CLI need not import it to recognise them.
_USER_ERRORS_IN = {"xmoe.training.runs": "RunInUseError", "xmoe.distributed.parallel": "RanksLost"}


def _user_errors() -> tuple[type[BaseException], ...]:
    from xmoe.extras import MissingExtra

    found = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS_IN.items()
                  if module in sys.modules)
    return (UsageError, CheckpointError, MissingExtra, *found)


if __name__ == "__main__":
    main(sys.argv[1:])
