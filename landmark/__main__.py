"""The ``landmark`` command: ``python -m landmark`` and the installed script both run :func:`main`."""

import sys


def main() -> int:
    """Run the command line (:func:`landmark.cli.main`); Ctrl-C while it starts (torch takes seconds to
    import) ends in one line, exit 130, as Ctrl-C during a command does."""
    try:
        from landmark.cli import main as command_line

        return command_line()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
