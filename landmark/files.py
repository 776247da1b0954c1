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
import functools
import json
import os
import re
import shutil
import stat
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


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, both resolved (False when either cannot be)."""
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        return False


def os_error_of(err: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, or None: ``err`` itself when it is an OSError,
    else one it was raised from or while handling (``torch.save`` on a full disk raises a RuntimeError
    from the ENOSPC), else the one a library names in its message (safetensors: ``... (os error 28)``)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


SOURCES_ATTRIBUTE = "landmark_sources"  # where the loaders note the folders a model was read from


def note_sources(model: Any, *folders: str | Path | None) -> Any:
    """Note on ``model`` the folders it was read from (its checkpoint; a delta and its base), so that an
    output of the Python API never replaces one of their files (:func:`model_sources`); returns it."""
    setattr(model, SOURCES_ATTRIBUTE, tuple(Path(f) for f in folders if f is not None))
    return model


def model_sources(model: Any) -> list[tuple[Path, str]]:
    """(folder, description) of the folders ``model`` was read from, as ``reads`` of
    :func:`check_output_file` ([] for a model no loader of the library made)."""
    return [(f, f"a file of {f}, the model's") for f in getattr(model, SOURCES_ATTRIBUTE, ())]


def missing_folders(path: str | Path | None) -> list[Path]:
    """``path`` and the folders above it that do not exist yet, the outermost first ([] for None or an
    existing path): what a ``mkdir(parents=True)`` of it would make."""
    missing: list[Path] = []
    if path is None or "\0" in os.fspath(path):
        return missing
    folder = Path(os.path.abspath(path))
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (outermost first, as :func:`missing_folders` lists them) that exist and
    are empty, the innermost first; a folder holding anything stays, and so do those above it."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENAMETOOLONG):  # (never made: go on above it)
                return  # not empty, or not ours to remove


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes (255 where it does not say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def first_line(err: BaseException) -> str:
    """The telling line of an error's message, for a one-line error: a ``size mismatch`` line if any
    (torch's state-dict errors), else the first non-empty one (the type's name if none), at most 200
    characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if "size mismatch" in line), lines[0])[:200]


def os_error_text(err: OSError) -> str:
    """``No space left on device (ENOSPC)``: the reason of an OSError with its errno name."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno is not None and err.errno in errno.errorcode:
        reason += f" ({errno.errorcode[err.errno]})"
    return reason


KERNEL_FILE_SYSTEMS = ("proc", "sysfs", "cgroup", "cgroup2", "debugfs", "securityfs", "configfs")


def _mount_refusing_folders(folder: Path) -> str | None:
    """``"a read-only file system (/mnt)"`` or ``"the proc file system (/proc)"`` where ``folder`` lies on
    a mount that takes no new folders, from ``/proc/self/mounts`` (Linux); None elsewhere or if unknown."""
    try:
        lines = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
        real = os.path.realpath(folder)
    except (OSError, UnicodeDecodeError):
        return None
    best = None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) > len(best[0])
        ):
            best = (point, fields[2], fields[3].split(","))
    if best is None:
        return None
    point, kind, options = best
    if kind in KERNEL_FILE_SYSTEMS:
        return f"the {kind} file system ({point})"
    if "ro" in options:
        return f"a read-only file system ({point})"
    return None


def path_problem(path: Path, *, folder: bool | None = None, writable: bool = False) -> str | None:
    """What is wrong with ``path`` as an input or output, or None: ``"does not exist"``, ``"is a
    symbolic link loop"``, ``"cannot be accessed (Permission denied)"``, ``"is a file, not a folder"`` /
    ``"is a folder, not a file"`` (``folder``: what it must be), ``"cannot be read (Permission
    denied)"``, and with ``writable`` ``"is not writable"`` / ``"cannot be created: X is not writable"``
    (a missing path: the nearest existing folder above it must be writable, and not on a read-only or
    kernel file system such as /proc); ``"holds a NUL character, which no path can"``. Never raises."""
    if "\0" in os.fspath(path):  # (os.stat would raise a ValueError)
        return "holds a NUL character, which no path can"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if err.errno == errno.EACCES:
            return "cannot be accessed (Permission denied)"
        if err.errno == errno.ENOTDIR and writable:
            return "cannot be created: a path component above it is a file"
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot be accessed ({err.strerror or err})"
        if os.path.islink(path):
            return "is a broken symbolic link"
        if not writable:
            return "does not exist"
        above = Path(os.path.abspath(path)).parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            return f"cannot be created: {above} is a file"
        if not os.access(above, os.W_OK | os.X_OK):
            return f"cannot be created: {above} is not writable"
        limit = _name_max(above)  # (the names still to be made: the system says so only once one is)
        to_make = Path(os.path.abspath(path)).relative_to(above).parts
        if any(len(os.fsencode(name)) > limit for name in to_make):
            return f"cannot be created: a name in it is longer than the {limit} bytes a name can have there"
        mount = _mount_refusing_folders(above)  # (root passes os.access even there)
        if mount is not None:
            return f"cannot be created: {above} is on {mount}"
        return None
    is_dir = os.path.isdir(path)
    if not os.path.lexists(path):  # removed since (another process pruning it)
        return "does not exist"
    if folder is True and not is_dir:
        return "is a file, not a folder"
    if folder is False and is_dir:
        return "is a folder, not a file"
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        # os.access also fails for a path removed a moment ago: that is not a permission problem
        return "cannot be read (Permission denied)" if os.path.lexists(path) else "does not exist"
    if writable and not os.access(path, os.W_OK | (os.X_OK if is_dir else 0)):
        return "is not writable"
    mount = _mount_refusing_folders(Path(path)) if writable else None
    if mount is not None:
        return f"is not writable: it is on {mount}"
    return None


def os_error_line(err: OSError, options: Iterable[tuple[str | Path | None, str]] = ()) -> str:
    """A failed read or write in one line: ``--save-state F: No space left on device (ENOSPC); ...``.
    The file is named by its option where ``options`` ((path, option) pairs) holds it or a folder it lies
    in; a full disk adds that the atomic writers left nothing partial behind."""
    where = None if err.filename is None else str(err.filename)
    label = where
    for path, option in options:
        if path is None or where is None or label != where:
            continue
        if os.path.abspath(str(path)) == os.path.abspath(where):
            label = f"{option} {path}"
        elif os.path.abspath(where).startswith(os.path.abspath(str(path)).rstrip("/") + "/"):
            label = f"{option} {path} ({where})"  # a file the command makes inside the option's folder
    text = f"{label}: {os_error_text(err)}" if label else os_error_text(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; nothing partial was written (an earlier file there is intact): free space, then run again"
    return text


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path``: a hidden file in the same folder (so that the final
    rename stays on one file system), named after the process so that concurrent writers never share it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@functools.cache
def _umask() -> int:
    """This process's file mode creation mask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it onto ``path``.

    The destination is either untouched or complete; on any exception (``KeyboardInterrupt``
    included) the temporary file is removed and the exception propagates; a library's error that comes
    from a failed write (a full disk: safetensors and torch raise their own kinds), like an OSError,
    propagates as an OSError of that errno whose filename is ``path``. The parent folder is created.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() gives (safetensors writes 0600)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = os_error_of(err) if isinstance(err, Exception) else None
        if cause is not None and cause.errno is not None:  # named after the destination, not the temporary
            raise OSError(cause.errno, cause.strerror, str(path)) from err
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
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
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
        option: the option that named it (``--save-state``), or the Python argument (``save_state``),
            for the message; a command-line option (``-...``) is told ``--overwrite``, an argument
            ``overwrite=True``.
        kind: what the command writes (``"a saved state"``), for the message.
        is_kind: whether an existing file is already that kind of output (it may then be replaced).
        reads: (file or folder, description) of everything the run reads; a folder covers every file
            in it. None and ``-`` (stdin) entries are skipped.
        overwrite: replace an existing file of another kind (never a file the run reads).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
        if os.path.islink(path):
            raise ValueError(f"{option} {path} is a broken symbolic link: give a file name") from None
    except OSError as err:
        raise ValueError(f"{option} {path} cannot be used: {os_error_text(err)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{option} {path} is a folder: give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{option} {path} is not a regular file (a device, pipe or socket): give a file name"
        )
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: its folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: its folder {folder} is not writable")
    mount = _mount_refusing_folders(folder)  # (root passes os.access even there)
    if mount is not None:
        raise ValueError(f"{option} {path}: its folder {folder} is not writable: it is on {mount}")
    what = _read_by(path, reads)
    if what is not None:
        raise ValueError(f"{option} {path} is {what}, which this command reads: write to another file")
    if path.exists() and not overwrite and not is_kind(path):
        flag = "--overwrite" if option.startswith("-") else "overwrite=True"
        raise ValueError(
            f"{option} {path} exists and is not {kind}: give a new file name, or {flag} to replace it"
        )
    return path


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk. A file that cannot be flushed raises (its data may not be on
    disk: a full disk can report itself only here); a folder is best effort (some file systems refuse to
    sync one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not stat.S_ISDIR(os.fstat(fd).st_mode) and err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
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
                if not f.is_symlink():
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


def check_not_input(
    out: str | Path,
    reads: Iterable[tuple[str | Path | None, str]],
    name: str = "--out",
    *,
    parents_ok: bool = False,
) -> None:
    """Refuse an output folder that is, holds or lies inside a folder the command reads (``reads``:
    (folder, option) pairs; None skipped): replacing it would destroy the input, or write into it.
    ``parents_ok``: an output that holds an input is fine (a command that adds files to its output
    folder, never replacing it: the evaluations' results beside a model kept in a subfolder).

    Raises:
        ValueError: ``--out X is --model: write the output to another folder`` (or "holds" / "is inside").
    """
    try:
        target = Path(out).resolve()
    except (OSError, RuntimeError):
        return  # an unusable path: check_out_folder names it
    for folder, option in reads:
        if folder is None:
            continue
        try:
            source = Path(folder).resolve()
        except (OSError, RuntimeError):
            continue
        relation = (
            "is" if target == source
            else "holds" if source.is_relative_to(target) and not parents_ok
            else "is inside" if target.is_relative_to(source)
            else None
        )  # fmt: skip
        if relation is not None:
            raise ValueError(
                f"{name} {out} {relation} {option} {folder}, which this command reads: write the output to "
                "another folder"
            )


def models_held(folder: str | Path) -> str | None:
    """What kind of model ``folder`` holds, if any: ``"a model"`` (a config.json beside weights in
    .safetensors files, or a delta.json), ``"a training run"`` (a config.json beside metrics.jsonl), or
    ``"prepared data"`` (a tokenizer.json beside token arrays); None for anything else."""
    try:
        names = {p.name for p in Path(folder).iterdir()}
    except OSError:  # not a folder, or unreadable: the output's own checks name it
        return None
    suffixes = {Path(n).suffix for n in names}
    if "delta.json" in names or ("config.json" in names and ".safetensors" in suffixes):
        return "a model"
    if {"config.json", "metrics.jsonl"} <= names:
        return "a training run"
    if "tokenizer.json" in names and ".bin" in suffixes:
        return "prepared data"
    return None


RESULTS_RECORD = ".landmark-results"  # in a results folder: a line per name the library wrote there
CELLS = "cells"  # the evaluations' cell cache in a results folder
SHARED = "-"  # the record's writer of a name every command may share (the cells cache)


def results_owners(out: str | Path) -> dict[str, str | None]:
    """The files and folders the library wrote into the results folder ``out``, each with the command
    that wrote it (None: any, a shared cache or a name recorded without one), from its
    :data:`RESULTS_RECORD`; without a record, everything in a folder holding the evaluations' ``cells``
    cache (results written before the record was kept); else nothing."""
    try:
        lines = (Path(out) / RESULTS_RECORD).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = None
    if lines is not None:
        owners = {}
        for line in filter(None, lines):
            name, _, command = line.partition("\t")
            owners[name] = None if command in ("", SHARED) else command
        return owners
    if (Path(out) / CELLS).is_dir():
        return {p.name: None for p in Path(out).iterdir()}
    return {}


def record_results(out: str | Path, names: Iterable[str], command: str | None = None) -> None:
    """Add ``names`` (written by ``command``; None: shared by every command) to the record of what the
    library wrote into ``out`` (made if missing): call when first writing them, so that a later run may
    replace them and an interrupted one resume."""
    owners = results_owners(out)
    new = {name: command for name in names if name not in owners or owners[name] != command}
    if new:
        Path(out).mkdir(parents=True, exist_ok=True)
        owners.update(new)
        lines = "".join(f"{n}\t{c or SHARED}\n" for n, c in sorted(owners.items()))
        write_text_atomic(Path(out) / RESULTS_RECORD, lines)


def check_results_folder(
    out: str | Path, outputs: Iterable[str] = (), name: str = "--out", command: str | None = None
) -> None:
    """A folder that receives results beside what it holds (the evaluations, the quickstart): one that
    can be made or written, holding no model, training run or prepared data (results would land among
    their files), and none of the command's ``outputs`` (file or folder names) unless the library wrote
    it there (:func:`record_results`), by this ``command`` where it says: a user's own file, or another
    command's result beside its table, would be replaced.

    Raises:
        ValueError: ``--out X holds a model: write the results to another folder``, ``--out X holds
            report.md, which landmark did not write: ...``, ``--out X is a symbolic link loop``.
    """
    problem = path_problem(Path(out), folder=True, writable=True)
    if problem is not None:
        raise ValueError(f"{name} {out} {problem}")
    held = models_held(out)
    if held is not None:
        raise ValueError(f"{name} {out} holds {held}: write the results to another folder")
    owners = results_owners(out)
    for output in outputs:
        if not os.path.lexists(Path(out) / output):
            continue
        if output not in owners:
            raise ValueError(
                f"{name} {out} holds {output}, which landmark did not write there (this command writes "
                f"it): choose another folder, or move the file away"
            )
        writer = owners[output]
        if command is not None and writer is not None and writer != command:
            raise ValueError(
                f"{name} {out} holds {output} from `landmark {writer}`, which this command would replace "
                f"beside that command's other results: choose another folder"
            )
