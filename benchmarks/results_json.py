"""The one way the benchmark scripts write their results: JSON with the command and the machine,
written to a temporary file and renamed (never half-written). Scripts run as ``python
benchmarks/<name>.py`` find this module next to them."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """``python benchmarks/<script> ARGS`` as it would be typed: ``argv`` (None: this process's
    arguments, ``sys.argv[1:]``; a script's ``main(argv)`` called from Python passes its own)."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *map(str, args)])


def write_results(out: str | Path, payload: dict[str, Any], command: str | None = None, **meta: Any) -> Path:
    """Write ``{"meta": {command, machine, **meta}, **payload}`` to ``out``; returns the path.

    ``command``: the command line to record (default: this process's, from ``sys.argv``; see
    :func:`command_line`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "command": command if command is not None else command_line(sys.argv[0]),
        "machine": platform.platform(),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": {**head, **meta}, **payload}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return out
