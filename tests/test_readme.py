"""The README's code example runs as written, so the first thing a user copies works."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md lost its python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["y"].shape == (4, 128, 512)
    assert namespace["block"].moe.experts.w1.grad is not None  # the loss reached the experts


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(python -m pip .*?)\s+# tests$", README.read_text(), re.M)
    assert len(commands) == 1
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[0].strip() in ci
