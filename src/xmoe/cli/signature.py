"""A command's flags read from its function's signature and docstring, as LitGPT's CLI reads them
through jsonargparse, but spelled the way `xmoe` has always spelled them (``--max-new-tokens``,
``--thresholds 0.5 0.7``, ``--resume`` without a value), which jsonargparse cannot do.

    def generate(*, checkpoint: str, prompt: str, max_new_tokens: int = 100, top_k: int | None = None):
        '''Sample text from a checkpoint.

        Args:
            checkpoint: run folder, Hugging Face folder or Hub id ORG/NAME
            max_new_tokens: tokens to generate
        '''

becomes ``--checkpoint`` (required), ``--prompt`` (required), ``--max-new-tokens`` (int, 100)
and ``--top-k`` (int or none). The rules: a positional-only parameter is a positional argument;
a keyword without a default is a required flag; ``bool`` is a switch (default False); ``list[X]``
takes one or more values; ``X | None`` is ``X`` or absent; ``Literal[...]`` lists its choices;
the help is the parameter's line under "Args:". Parameters the runner supplies itself (the
command line, the run-config flags) are left out by name.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable


def add_signature(parser: argparse.ArgumentParser, function: Callable, *, skip: tuple[str, ...] = ()) -> None:
    """Add a flag to ``parser`` for every parameter of ``function`` but those named in ``skip``."""
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
