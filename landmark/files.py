"""Writing files without losing data: the one atomic writer, and the check that keeps an output off
the files a run reads.

Every file the library writes goes through :func:`atomic_write`: the content goes to a temporary file
beside the destination, which replaces the destination only once it is complete; on any failure (a
full disk, an interrupt, an error in the writer) the temporary file is removed and the destination is
left as it was. :func:`check_output_file` runs before any work: a command that writes a file refuses

* a destination that is a folder, or whose folder does not exist;
* a file the same run reads (the prompt, a loaded state, any file of the model's folder), even with
  ``--overwrite``;
* an existing file that is not the command's own kind of output (a saved state is recognised by its
  metadata), unless ``--overwrite`` is given.

This module imports nothing from the library (every layer may use it).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # bytes: a larger header is not a safetensors file we wrote


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path``: a hidden file in the same folder (so that the final
    rename stays on one file system), named after the process so that concurrent writers never share it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it onto ``path``.

    The destination is either untouched or complete; on any exception (``KeyboardInterrupt``
    included) the temporary file is removed and the exception propagates. The parent folder is created.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (``indent`` spaces, a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none), or None when ``path``
    is not a readable safetensors file. Reads only the header (no tensor data, no safetensors import)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if not 2 <= size <= SAFETENSORS_HEADER_LIMIT:
                return None
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__", {})
    return meta if isinstance(meta, dict) else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _read_by(path: Path, reads: Iterable[tuple[str | Path | None, str]]) -> str | None:
    """What ``reads`` names ``path`` as (the description of a file, or of a folder holding it), or None.
    A folder counts as every file inside it, at any depth."""
    resolved = path.resolve()
    for source, what in reads:
        if source is None or str(source) == "-":
            continue
        source = Path(source)
        if source.is_dir():
            if path.exists() and resolved.is_relative_to(source.resolve()):
                return what
        elif _same_file(path, source):
            return what
    return None


def check_output_file(
    path: str | Path,
    option: str,
    *,
    kind: str,
    is_kind: Callable[[Path], bool],
    reads: Iterable[tuple[str | Path | None, str]] = (),
    overwrite: bool = False,
) -> Path:
    """Refuse, with a one-line ValueError naming ``option``, a destination that would lose data.

    Args:
        path: the file the command will write.
        option: the option that named it (``--save-state``), for the message.
        kind: what the command writes (``"a saved state"``), for the message.
        is_kind: whether an existing file is already that kind of output (it may then be replaced).
        reads: (file or folder, description) of everything the run reads; a folder covers every file
            in it. None and ``-`` (stdin) entries are skipped.
        overwrite: replace an existing file of another kind (never a file the run reads).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name")
    if not path.resolve().parent.is_dir():
        raise ValueError(f"{option} {path}: its folder does not exist")
    what = _read_by(path, reads)
    if what is not None:
        raise ValueError(f"{option} {path} is {what}, which this command reads: write to another file")
    if path.exists() and not overwrite and not is_kind(path):
        raise ValueError(
            f"{option} {path} exists and is not {kind}: give a new file name, or --overwrite to replace it"
        )
    return path
