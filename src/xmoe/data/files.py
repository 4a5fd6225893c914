"""Reading user text files with errors that name the file and line, and atomic file writes
(readers see the old file or the new one, never a half-written one)."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path

from xmoe.errors import UsageError


def check_regular_file(path: Path, what: str = "text file") -> None:
    """Refuse what is not a plain file before opening it: reading a named pipe, a socket or a
    device would block or never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        what_it_is = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or special file"
        raise UsageError(f"{path} is {what_it_is}, not a regular file; save the text to a file and give that")


def decode_lines(raw_lines: Iterable[bytes], source: str) -> list[str]:
    """UTF-8 lines (a BOM on the first is dropped), or a ValueError naming ``source`` and the line."""
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as err:
            raise UsageError(f"{source}, line {number}: not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                             f"{err.start + 1}); convert the text to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    return lines


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, sync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path.name))
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_name(name: str) -> str:
    """A hidden name for a temporary twin of ``name``, unique to this process and call."""
    return f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
