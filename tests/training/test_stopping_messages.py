"""What a stopped run tells the user, for both training commands: where the checkpoint is, the
command that goes on, and the shell's exit status for the signal."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from xmoe.training.stopping import exit_if_interrupted


@pytest.mark.parametrize("train, evaluate", [("xmoe train", "xmoe eval"), ("xmoe train-mt", "xmoe eval-mt")])
def test_a_stopped_run_says_how_to_go_on_and_exits_with_the_signal(train, evaluate, capsys) -> None:
    stopped = SimpleNamespace(interrupted=True, steps=7, signal=signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        exit_if_interrupted(stopped, 10, "runs/a", train=train, evaluate=evaluate)
    assert exit_.value.code == 143
    assert f"interrupted by SIGTERM: checkpoint saved at step 7 in runs/a; continue with: {train} --out runs/a --resume" \
        in capsys.readouterr().out

    finished = SimpleNamespace(interrupted=True, steps=10, signal=signal.SIGINT)
    with pytest.raises(SystemExit) as exit_:
        exit_if_interrupted(finished, 10, "runs/a", train=train, evaluate=evaluate)
    assert exit_.value.code == 130
    assert f"the run is complete (checkpoint at step 10 in runs/a); evaluate it with: {evaluate} --checkpoint runs/a" \
        in capsys.readouterr().out


def test_a_run_that_finished_goes_on() -> None:
    exit_if_interrupted(SimpleNamespace(interrupted=False), 10, "runs/a", train="xmoe train", evaluate="xmoe eval")
