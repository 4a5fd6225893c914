"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and `timeout` send).

While the loop trains, a signal only records itself; the loop reads the record at step
boundaries, so a stop never falls between an optimizer step and the step count a checkpoint
records (the saved step and the saved weights always agree). The loop then saves and returns,
and the command exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell
reports a process killed by that signal. More signals while the checkpoint is written are noted
and ignored, so the save always finishes. Once the checkpoint is safe (the final evaluation),
``interruptible()`` turns a signal into an immediate ``KeyboardInterrupt``.

Before the loop (reading data, training a tokenizer) there is nothing to save:
``StopSignals(raising=True)`` turns both signals into a ``Stopped`` exception there, so that a
SIGTERM, which would otherwise end the process at once, lets a failed start clean up after
itself (xmoe.training.runs).

Handlers can only be installed from the main thread; elsewhere the previous behaviour stays.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int | None) -> int:
    """The exit status a shell gives a process ended by ``signum`` (130 for SIGINT, 143 for
    SIGTERM); 130 when the stop came without a signal (a KeyboardInterrupt raised by code)."""
    return 128 + (signum if signum is not None else signal.SIGINT)


def signal_name(signum: int | None) -> str:
    """How a stop is reported: "interrupted by SIGTERM" (or "interrupted" without a signal)."""
    return f"interrupted by {signal.Signals(signum).name}" if signum is not None else "interrupted"


def exit_if_interrupted(result, max_steps: int, run_dir, *, train: str, evaluate: str,
                        resume: str | None = None) -> None:
    """After a run a signal stopped: say where its checkpoint is and how to go on, then exit with
    the signal's status. ``train`` and ``evaluate`` are the commands (e.g. "xmoe train");
    ``resume``, the whole command that continues, when it is not ``train --out RUN --resume``."""
    if not result.interrupted:
        return
    if result.steps == max_steps:
        print(f"\n{signal_name(result.signal)} during the final evaluation: the run is complete "
              f"(checkpoint at step {result.steps} in {run_dir}); evaluate it with: {evaluate} --checkpoint {run_dir}")
    else:
        print(f"\n{signal_name(result.signal)}: checkpoint saved at step {result.steps} in {run_dir}; "
              f"continue with: {resume or f'{train} --out {run_dir} --resume'}")
    sys.exit(exit_code(result.signal))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Stopped(KeyboardInterrupt):
    """A stop signal raised as an exception (a KeyboardInterrupt, so code that handles Ctrl-C
    handles it too); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """A context manager that turns SIGINT and SIGTERM into a request the loop polls
    (``raising=True``: into ``Stopped`` at once, as inside ``interruptible()``).

        with StopSignals() as stop:
            for step in ...:
                ...                       # a signal here only sets stop.signum
                if stop.signum is not None:
                    break
            save()                        # a second signal is announced and ignored
            with stop.interruptible():
                evaluate()                # a signal here raises Stopped (a KeyboardInterrupt)
    """

    def __init__(self, say: Callable[[str], None] = _say, *, raising: bool = False) -> None:
        self.signum: int | None = None
        self._say = say
        self._raise = raising
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def request(self, signum: int) -> None:
        """Record a stop as if ``signum`` had arrived (a KeyboardInterrupt raised by other code)."""
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, a signal stops the work at once (``Stopped``) instead of being deferred."""
        self._raise = True
        try:
            yield
        finally:
            self._raise = False

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        first = self.signum is None
        self.request(signum)
        if self._raise:
            raise Stopped(signum)
        if first:
            self._say(f"\n{name} received: finishing the current step, then saving a checkpoint")
        else:
            self._say(f"\n{name} received again: still saving the checkpoint; it takes a moment")
