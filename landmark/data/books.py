"""The bundled default corpus: 284 public-domain books shipped as ``data/books.tar.xz``.

The archive (5.7 MB, 22.6 MB of text; see ``data/PROVENANCE.md`` and ``data/LICENSE-NOTES.md``) is
extracted once into ``<cache>/books/``. ``<cache>`` is ``$LANDMARK_CACHE`` when set, else the
repository's git-ignored ``cache/`` folder.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from landmark.files import is_within, staged_folder

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOKS_ARCHIVE = REPO_ROOT / "data" / "books.tar.xz"
CACHE_ENV = "LANDMARK_CACHE"


def cache_root() -> Path:
    """The folder for extracted corpora, prepared token arrays and downloaded tokenizer files.

    Returns:
        ``$LANDMARK_CACHE`` if set, else ``<repository>/cache`` (git-ignored).
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / "cache"


def check_outside_cache(out: str | Path, name: str = "--out") -> None:
    """Refuse (ValueError naming ``name``) an output folder inside the data cache (:func:`cache_root`:
    the library's prepared data, models and books), which no command writes results or models into."""
    if is_within(out, cache_root()):
        raise ValueError(f"{name} {out} is inside the data cache {cache_root()}: write it elsewhere")


def bundled_books(cache: str | Path | None = None, archive: str | Path = BOOKS_ARCHIVE) -> Path:
    """Extract the bundled books once and return their folder (a plain folder of ``.txt`` documents).

    The archive is unpacked into a temporary folder next to the destination and renamed into place, so
    the folder is either absent or complete, even if several processes extract at once.

    Args:
        cache: the cache root; default :func:`cache_root`.
        archive: the ``.tar.xz`` holding a top-level ``books/`` folder.

    Returns:
        ``<cache>/books``, ready for :func:`landmark.data.read_corpus`.

    Raises:
        FileNotFoundError: the archive is missing (it ships with a source checkout of the repository).
    """
    dest = Path(cache) if cache is not None else cache_root()
    dest = dest / "books"
    if dest.is_dir():
        return dest
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"bundled corpus archive {archive} not found: use a source checkout of the repository, "
            "or pass the folder of your own corpus instead"
        )
    with staged_folder(dest) as tmp:  # a concurrent extraction that wins the race is kept
        with tarfile.open(archive, "r:xz") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe members
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        for member in list((tmp / "books").iterdir()):  # the archive's top folder becomes dest
            member.rename(tmp / member.name)
        (tmp / "books").rmdir()
    return dest
