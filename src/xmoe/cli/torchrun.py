"""torchrun as `xmoe train --nproc N` runs it (xmoe.cli.lm.relaunch): torchrun itself, quiet when a
stop ends it. On SIGINT or SIGTERM torchrun stops its ranks and then raises SignalException, whose
traceback would follow the ranks' own words on where their checkpoint is and how to go on; here
it exits with 128 + the signal instead, as a process that signal stopped."""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
