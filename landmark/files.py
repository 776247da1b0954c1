"""Writing files and folders without losing data: the one atomic writer of files, the one staged
writer of folders, the run-folder lock, and the check that keeps an output off the files a run reads.

Every file the library writes goes through :func:`atomic_write`: the content goes to a temporary file
beside the destination, which replaces the destination only once it is complete; on any failure (a
full disk, an interrupt, an error in the writer) the temporary file is removed and the destination is
left as it was. :func:`check_output_file` runs before any work: a command that writes a file refuses

* a destination that is a folder, or whose folder does not exist;
* a file the same run reads (the prompt, a loaded state, any file of the model's folder), even with
  ``--overwrite``;
* an existing file that is not the command's own kind of output (a saved state is recognised by its
  metadata), unless ``--overwrite`` is given.

Every folder the library writes whole (a checkpoint, a prepared model, an extracted corpus) is
written into a temporary folder beside its destination by :func:`staged_folder`, which renames it into
place once complete; :func:`replace_folder` swaps a complete staging folder for an existing output.
:class:`RunLock` holds a run folder for as long as one process trains into it.

This module imports nothing from the library (every layer may use it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked
    fcntl = None

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


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (best effort: some file systems refuse to sync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(dest: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Write a folder whole: yield a fresh temporary folder beside ``dest``; when the block ends without
    an exception it is renamed to ``dest``. The temporary folder is removed in every case.

    ``dest`` must not exist or be an empty folder. If it was filled meanwhile (another process writing
    the same output won the race), the staged copy is dropped and ``dest`` is left as the other writer
    made it; the caller checks it if it must. The staged folder gets the usual permissions (a temporary
    folder is private). ``durable``: every file, the folder and its parent are flushed to disk.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if durable:
            for f in tmp.rglob("*"):
                fsync_path(f)
        try:
            os.rename(tmp, dest)  # onto a missing or empty folder
        except OSError:
            if not dest.is_dir():
                raise
        if durable:
            fsync_path(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(staging: str | Path, out: str | Path) -> Path:
    """Move the complete folder ``staging`` to ``out``, replacing what was there only once the new
    folder is complete: the old ``out`` is renamed aside, then removed. Returns ``out`` as a Path."""
    staging, out = Path(staging), Path(out)
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


class FolderInUseError(ValueError):
    """Another process holds the run folder (:class:`RunLock`)."""


class RunLock:
    """An exclusive hold on a run folder for as long as one process trains into it.

    ``fcntl.flock`` on the folder itself: no file is created in it, and the kernel releases the hold when
    the process ends, ``kill -9`` included, so a killed run never leaves its folder stuck. Only process
    0 of a torchrun job holds it. Where flock is unavailable (Windows, some network file systems) the
    folder is not held."""

    def __init__(self, folder: Path, option: str = "train.out_dir") -> None:
        self.folder = folder
        self.option = option  # named in the refusal
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Hold the (existing) folder; raise FolderInUseError naming it when another process holds it."""
        if fcntl is None or self.held:
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUseError(
                    f"{self.folder} is in use: another training run holds it ({self.option}): wait for "
                    f"that run to end (then --resume continues it), or choose another {self.option}"
                ) from None
            return  # flock unsupported here: train without the hold
        self._fd = fd

    def release(self) -> None:
        """Let the folder go (closing the descriptor drops the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
