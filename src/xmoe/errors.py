"""The one exception type for a user's mistake: ``xmoe`` prints it as one line (exit status 2),
while any other exception keeps its traceback, because it is a bug.

This module imports nothing from xmoe, so every layer may use it.
"""

import errno

# ENOSPC: disk full, EDQUOT: quota exceeded, EFBIG: file size limit; safetensors (Rust) reports
# them in its message only.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UsageError(ValueError):
    """A mistake in what the user asked for (a flag, a config value, a file or folder given);
    the message names it and how to fix it."""


def check_counts(owner: str, *, minimum: int = 1, **values: object) -> None:
    """A UsageError naming ``owner.NAME`` for the first of ``values`` that is not an integer
    >= ``minimum`` (1: a positive integer, 0: a non-negative one; True and False are not counts)."""
    kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UsageError(f"{owner}.{name} must be {kind}, got {value!r}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, unsafe or made for another model;
    the message names the file and what to do."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that found no space: a full disk, a quota or a file-size limit
    (an OSError, or a SafetensorError or RuntimeError quoting the OS error)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    return isinstance(err, Exception) and any(f"os error {code})" in str(err) for code in DISK_FULL)
