"""What a stopped run tells the user, for both training commands: where the checkpoint is, the
command that goes on, and the shell's exit status for the signal."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from xmoe.training.stopping import exit_if_interrupted


COMMANDS = [("xmoe train", "xmoe eval"), ("xmoe train-mt", "xmoe eval-mt")]
# (steps done of 10, signal, exit status, what the run says with {train} and {evaluate} filled in)
STOPS = [
    (7, signal.SIGTERM, 143, "interrupted by SIGTERM: checkpoint saved at step 7 in runs/a; continue with: "
                             "{train} --out runs/a --resume"),
    (10, signal.SIGINT, 130, "the run is complete (checkpoint at step 10 in runs/a); evaluate it with: "
                             "{evaluate} --checkpoint runs/a"),
]


@pytest.mark.parametrize("train, evaluate", COMMANDS)
@pytest.mark.parametrize("steps, signum, status, message", STOPS)
def test_a_stopped_run_says_how_to_go_on_and_exits_with_the_signal(train, evaluate, steps, signum, status, message,
                                                                   capsys) -> None:
    stopped = SimpleNamespace(interrupted=True, steps=steps, signal=signum)
    with pytest.raises(SystemExit) as exit_:
        exit_if_interrupted(stopped, 10, "runs/a", train=train, evaluate=evaluate)
    assert exit_.value.code == status
    assert message.format(train=train, evaluate=evaluate) in capsys.readouterr().out


def test_a_run_that_finished_goes_on() -> None:
    exit_if_interrupted(SimpleNamespace(interrupted=False), 10, "runs/a", train="xmoe train", evaluate="xmoe eval")
