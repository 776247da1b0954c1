"""The one way the benchmark scripts write their results: JSON with the command and the machine,
written to a temporary file and renamed (never half-written). Scripts run as ``python
benchmarks/<name>.py`` find this module next to them."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any


def write_results(out: str | Path, payload: dict[str, Any], **meta: Any) -> Path:
    """Write ``{"meta": {command, machine, **meta}, **payload}`` to ``out``; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).name
    head = {
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": {**head, **meta}, **payload}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return out
