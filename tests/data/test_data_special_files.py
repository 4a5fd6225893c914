"""Inputs that are not regular files (a named pipe as --data) are refused at once, never read:
reading a pipe blocks until a writer comes, which for a mistyped path is forever."""

from __future__ import annotations

import os
import threading

import pytest

from xmoe.data import load_corpus
from xmoe.data.translation import read_lines


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    done = threading.Event()

    def unblock():  # should a reader block on the pipe, give it text after 5 s so the test fails, not hangs
        if not done.wait(5):
            with open(path, "w") as f:
                f.write("text that should never have been read\n")

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


@pytest.mark.parametrize("read", [load_corpus, read_lines])
def test_a_named_pipe_is_refused_without_reading_it(fifo, read):
    with pytest.raises(ValueError, match=f"{fifo} is a named pipe, not a regular file"):
        read(str(fifo))


def test_a_named_pipe_inside_a_data_folder_is_refused(fifo):
    (fifo.parent / "real.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="is a named pipe"):
        load_corpus(str(fifo.parent))
