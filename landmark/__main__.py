"""The ``landmark`` command: ``python -m landmark`` and the installed script both run :func:`main`."""

import signal
import sys


def main() -> int:
    """Run the command line (:func:`landmark.cli.main`); Ctrl-C while it starts (torch takes seconds to
    import) ends in one line, exit 130, as Ctrl-C during a command does. Once the command has returned,
    Ctrl-C is ignored: its work is done, and during the interpreter's shutdown (a second or so with torch
    loaded) Python no longer handles the signal, so the process would die of it (exit -2, no message)."""
    try:
        from landmark.cli import main as command_line

        status = command_line()
    except KeyboardInterrupt:
        status = 130
        print("interrupted", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


if __name__ == "__main__":
    sys.exit(main())
