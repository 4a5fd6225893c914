"""What a newcomer follows to read one training run: the files and functions of src/xmoe that
`xmoe train` enters before its first optimizer step, traced with sys.setprofile.

    PYTHONPATH=src python benchmarks/train_trace.py           # counts
    PYTHONPATH=src python benchmarks/train_trace.py --files   # and the files, in the order entered

Counted: calls of functions defined in src/xmoe, except those an import runs (module bodies,
decorators, default instances) and lambdas and comprehensions, from the command's entry point to the first call of a
torch.optim optimizer's ``step``. "Switches" counts the calls whose file differs from that of the
previous counted call: how often a reader jumps between files.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import xmoe

ROOT = str(Path(xmoe.__file__).parent)
SKIPPED = {"<module>", "<lambda>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


class Trace:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (file relative to src/xmoe, function)
        self.done = False

    def __call__(self, frame, event, arg) -> None:
        if self.done or event != "call":
            return
        code = frame.f_code
        if code.co_name == "step" and "torch/optim/" in code.co_filename:
            self.done = True
        elif code.co_filename.startswith(ROOT) and code.co_name not in SKIPPED and not _importing(frame):
            self.calls.append((code.co_filename[len(ROOT) + 1:], code.co_qualname))


def _importing(frame) -> bool:
    """Whether the call runs while a module is imported (a decorator, a default instance)."""
    frame = frame.f_back
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_code.co_filename != __file__:
            return True
        frame = frame.f_back
    return False


def main(argv: list[str]) -> None:
    from xmoe.cli.main import main as xmoe_main

    words = "the quick brown fox jumps over the lazy dog while experts route tokens".split()
    rng = random.Random(0)
    trace = Trace()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
        args = ["train", "--preset", "debug-xmoe", "--data.path", str(corpus), "--data.vocab_size=300",
                f"--data.cache_dir={tmp}/cache", "--out", f"{tmp}/run", "--train.max_steps=1", "--train.batch_size=2",
                "--train.seq_len=16", "--train.eval_batches=1", "--threads=1"]
        sys.setprofile(trace)
        try:
            xmoe_main(args)
        except SystemExit:
            pass
        finally:
            sys.setprofile(None)
    assert trace.done, "the run never reached an optimizer step"
    files = list(dict.fromkeys(f for f, _ in trace.calls))
    switches = sum(1 for a, b in zip(trace.calls, trace.calls[1:]) if a[0] != b[0])
    print(f"xmoe train -> first optimizer step: {len(files)} files, {len(set(trace.calls))} functions, "
          f"{switches} switches between files")
    if "--files" in argv:
        print("\n".join(f"  {f}" for f in files))


if __name__ == "__main__":
    main(sys.argv[1:])
