"""The ``landmark`` command: ``python -m landmark`` and the installed script both run :func:`main`."""

import os
import signal
import sys


def main() -> int:
    """Run the command line (:func:`landmark.cli.main`) with Ctrl-C answered in one line, exit 130.

    Ctrl-C during an import (torch takes seconds to import, and commands import more as they go) ends
    the process at once: an exception raised inside an import can leave a half-imported module that a
    library's ``except:`` swallows (the command then failed later, or ran on), or cross C++ code that
    aborts on it. Imports write nothing of ours, so nothing is lost. Anywhere else Ctrl-C raises
    ``KeyboardInterrupt``, which the command turns into ``interrupted`` after closing what it writes
    (atomic writes remove their temporary files). Once the command has returned, Ctrl-C is ignored: its
    work is done, and during the interpreter's shutdown (a second or so with torch loaded) Python no
    longer handles the signal, so the process would die of it (exit -2, no message).
    """
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        from landmark.cli import main as command_line

        status = command_line()
    except KeyboardInterrupt:
        status = 130
        print("interrupted", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


def _on_interrupt(signum, frame) -> None:
    """SIGINT: exit now inside an import (any frame of the import machinery on the stack), else raise
    ``KeyboardInterrupt``."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            sys.stderr.write("interrupted\n")
            sys.stderr.flush()
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
