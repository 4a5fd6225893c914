"""Distributed launch for `xmoe train`: `--nproc N` re-runs the command under torchrun, and a
process that torchrun started joins the run (xmoe.distributed.init_from_env).

    xmoe train --nproc 2 --ep-size 2 --preset cpu-xmoe-64x128 --out runs/ep
    torchrun --nproc-per-node 2 -m xmoe train --ep-size 2 --preset cpu-xmoe-64x128 --out runs/ep
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from xmoe.errors import UsageError


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(command_line: list[str], nproc: int) -> int:
    """Run this same `xmoe` command (its arguments: ``command_line``) under torchrun with
    ``nproc`` processes; its exit code."""
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "xmoe", *_without_nproc(command_line)]
    print("launching:", " ".join(command), flush=True)
    # torchrun and its ranks in a process group of their own: a stop reaches them once, from here.
    return wait_forwarding_signals(subprocess.Popen(command, start_new_session=True))


def wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for ``proc``, the leader of its own process group, passing SIGINT and SIGTERM on to
    the whole group (torchrun and every rank), so that the ranks stop together after their
    coordinated save. Returns the exit status: 128 + the first signal (130, 143) if one came,
    as for a process that signal stopped; otherwise ``proc``'s."""
    from xmoe.training.stopping import STOP_SIGNALS, exit_code

    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):  # the group has just ended
            os.killpg(proc.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        status = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_code(received[0]) if received else status


@contextlib.contextmanager
def parallel_context(ep_size: int, train):
    """The Parallel of this rank under torchrun (None in a plain single process), set up from the
    run's ``train`` config (train.device: auto, cpu, cuda; its collective timeout)."""
    if not under_torchrun():
        if ep_size != 1:
            raise UsageError(f"--ep-size {ep_size} needs several processes: add --nproc N, or launch with torchrun")
        yield None
        return
    import torch.distributed as dist

    from xmoe.distributed import init_from_env

    parallel, _ = init_from_env(ep_size, train.device, timeout_s=train.collective_timeout_s)
    try:
        yield parallel
    finally:
        dist.destroy_process_group()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
