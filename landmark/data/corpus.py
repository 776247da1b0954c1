"""Read a text corpus: a folder of ``.txt`` documents, split into train and validation by document.

Two layouts are recognised:

* **PG-19**: the folder holds ``train/`` and ``validation/`` (and optionally ``test/``) sub-folders of
  ``.txt`` books; the splits are used as given.
* **Plain folder**: every ``.txt`` file below the folder (recursively) is a document. Each document goes
  to the validation split when a hash of its relative path falls below ``validation_fraction``, so the
  split is deterministic, stable when documents are added, and independent of the machine.

Documents are listed, sorted by relative path; their text is read only when needed
(:meth:`Document.read_text`), so listing PG-19 (11 GB) is instant. Zero-byte files are skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

VALIDATION_FRACTION = 0.05  # share of documents of a plain folder that go to the validation split
PG19_SPLITS = ("train", "validation", "test")


class CorpusError(ValueError):
    """A corpus that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Document:
    """One ``.txt`` document of a corpus."""

    name: str  # path relative to the corpus root, with '/' separators
    path: Path
    size: int  # bytes
    mtime_ns: int

    def read_text(self) -> str:
        """The document's text.

        Raises:
            CorpusError: the file is not valid UTF-8 (the message names the file and the byte offset).
        """
        data = self.path.read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"{self.path} is not valid UTF-8 (bad byte at offset {err.start}): "
                "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from the corpus"
            ) from None


@dataclass(frozen=True)
class Corpus:
    """A corpus: its root folder, its layout, and its documents by split (each list sorted by name)."""

    root: Path
    layout: str  # "pg19" or "folder"
    splits: dict[str, list[Document]]

    def fingerprint(self, split: str) -> str:
        """A short hash of a split's document names, sizes and modification times (the cache key)."""
        h = hashlib.sha256()
        for doc in self.splits[split]:
            h.update(f"{doc.name}\0{doc.size}\0{doc.mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def read_corpus(root: str | Path, validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
    """List a corpus folder and split it by document.

    Args:
        root: a PG-19 style folder (``train/``, ``validation/``, optional ``test/``) or any folder of
            ``.txt`` documents (searched recursively).
        validation_fraction: plain folders only: the expected share of documents in the validation
            split. Both splits get at least one document.

    Returns:
        A :class:`Corpus` with splits ``train``, ``validation`` (and ``test`` for PG-19 when present).

    Raises:
        CorpusError: the folder is missing, holds no ``.txt`` files, holds only empty ones, or (plain
            folder) holds a single document, which cannot be split.
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist: pass a folder of .txt documents")
    if (root / "train").is_dir() and (root / "validation").is_dir():
        present = [s for s in PG19_SPLITS if (root / s).is_dir()]
        splits = {s: _list_documents(root / s, root) for s in present}
        return Corpus(root, "pg19", splits)
    docs = _list_documents(root, root)
    if len(docs) < 2:
        raise CorpusError(
            f"corpus folder {root} holds a single non-empty document ({docs[0].name}); a train/validation "
            "split needs at least two: cut it into several .txt files"
        )
    return Corpus(root, "folder", _split_by_hash(docs, validation_fraction))


def _list_documents(folder: Path, root: Path) -> list[Document]:
    paths = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not paths:
        raise CorpusError(f"no .txt files found under {folder}: put the documents there as UTF-8 .txt files")
    docs = []
    for p in paths:
        st = p.stat()
        if st.st_size > 0:
            docs.append(Document(p.relative_to(root).as_posix(), p, st.st_size, st.st_mtime_ns))
    if not docs:
        raise CorpusError(f"all {len(paths)} .txt files under {folder} are empty: add some text")
    docs.sort(key=lambda d: d.name)
    return docs


def _split_position(name: str) -> float:
    """A uniform number in [0, 1) determined by a document's relative path."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def _split_by_hash(docs: list[Document], fraction: float) -> dict[str, list[Document]]:
    if not 0.0 < fraction < 1.0:
        raise CorpusError(f"validation_fraction must be in (0, 1); got {fraction}")
    pos = {d.name: _split_position(d.name) for d in docs}
    validation = {d.name for d in docs if pos[d.name] < fraction}
    if not validation:  # the document with the lowest hash
        validation = {min(docs, key=lambda d: pos[d.name]).name}
    if len(validation) == len(docs):  # keep the document with the highest hash for training
        validation.discard(max(docs, key=lambda d: pos[d.name]).name)
    return {
        "train": [d for d in docs if d.name not in validation],
        "validation": [d for d in docs if d.name in validation],
    }
