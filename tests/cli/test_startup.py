"""`xmoe --help` and `xmoe presets` start without importing torch (or transformers, matplotlib):
the command table imports only the light command modules, a command's heavy flags are added when
it is used, and the presets are listed from torch-free configs and counts (xmoe.models.config,
xmoe.models.counts). Checked in a fresh interpreter, so other tests' imports don't count."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "matplotlib", "numpy")

PROBE = r"""
import contextlib, io, json, sys
from xmoe.cli.main import build_parser, main
imported = {"module": sorted(sys.modules)}
build_parser()
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
imported["help"] = sorted(sys.modules)
imported["printed"] = out.getvalue()
print(json.dumps(imported))
"""


PRESETS_PROBE = r"""
import contextlib, io, json, sys
from xmoe.cli.main import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    main(["presets"])
print(json.dumps({"presets": sorted(sys.modules), "printed": out.getvalue()}))
"""


def _probe(code: str = PROBE) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(HEAVY))


def test_the_command_table_and_help_import_no_heavy_module() -> None:
    probe = _probe()
    assert "xmoe.cli.main" in probe["module"]
    assert _heavy(probe["module"]) == [], "import xmoe.cli.main"
    assert _heavy(probe["help"]) == [], "xmoe --help"
    for command in ("train", "sweep-threshold", "study", "presets", "bench"):  # the help lists every command
        assert command in probe["printed"]
    # examples for a user, not the module's notes for its developers (it printed "add_signature")
    examples = probe["printed"].split("examples:\n", 1)[1]
    assert "xmoe demo" in examples and "add_signature" not in probe["printed"] and "xmoe.cli" not in examples


def test_presets_imports_no_heavy_module() -> None:
    """The whole table, translation presets included, counted from the configs alone."""
    probe = _probe(PRESETS_PROBE)
    assert _heavy(probe["presets"]) == [], "xmoe presets"
    for row in ("| gpt2-xmoe-64x384 | 12 d768 |", "| base-xmoe-64x1024 | 6+6 d512 |"):
        assert row in probe["printed"]


def test_a_command_still_gets_its_deferred_flags(capsys) -> None:
    """`xmoe study`'s choices and `xmoe train`'s run-config flags come from torch-importing
    modules, added when the command is parsed: its help lists them, a wrong value is refused."""
    from xmoe.cli.main import build_parser

    parser = build_parser()
    args, rest = parser.parse_known_args(["train", "--out", "x", "--train.max_steps=5", "--preset", "debug-xmoe"])
    assert (args.preset, getattr(args, "train.max_steps"), rest) == ("debug-xmoe", "5", [])
    try:
        build_parser().parse_known_args(["study", "everything"])
    except SystemExit:
        pass
    assert "invalid choice: 'everything'" in capsys.readouterr().err
    try:
        build_parser().parse_args(["train", "--help"])
    except SystemExit:
        pass
    assert "--model.moe.threshold" in capsys.readouterr().out


def test_the_user_errors_named_by_module_exist():
    """The CLI recognises some user errors without importing their modules (a module the command
    did not import raised none); a renamed class or module must fail here, not turn a one-line
    error into a traceback."""
    import importlib

    from xmoe.cli.main import _USER_ERRORS_IN

    for module, name in _USER_ERRORS_IN.items():
        found = getattr(importlib.import_module(module), name)
        assert isinstance(found, type) and issubclass(found, Exception), (module, name)
