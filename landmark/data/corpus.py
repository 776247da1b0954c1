"""Read a text corpus: a folder of ``.txt`` documents, split into train and validation by document.

Two layouts are recognised:

* **PG-19**: the folder holds ``train/`` and ``validation/`` (and optionally ``test/``) sub-folders of
  ``.txt`` books; the splits are used as given.
* **Plain folder**: every ``.txt`` file below the folder (recursively) is a document, and the validation
  split is chosen by a deterministic, stratified rule (:func:`split_documents`) that depends only on the
  documents' relative paths and sizes, never on the machine:

  1. **Families.** A document's family is the first folder of its relative path when it has one
     (``sotu/1790_george_washington.txt`` -> ``sotu``), else its file name up to the first ``_``
     (``shakespeare_hamlet.txt`` -> ``shakespeare``). Documents alone in their family are pooled into
     one family, so a folder of unrelated names is still split.
  2. **Ranks by length.** In each family, documents are ordered by size, largest first (ties by name).
  3. **Evenly spaced picks.** A family of ``n >= 2`` documents sends ``m = max(1, round(n * fraction))``
     of them (at most ``n - 1``) to validation: ranks ``1 + floor(j * (n - 1) / m)`` for
     ``j = 0 .. m-1``. Rank 1, the second-longest document of every family, is always picked, so the
     validation split always holds long documents; the longest of each family stays in training.

  On the bundled books (``fraction = 0.05``) this gives 16 of 284 documents, 2.44 MB of 22.6 MB of
  text: Moby-Dick (the second-longest of the pooled single documents; the Bible stays in training),
  Hamlet and As You Like It, Milton's Comus, and 12 State of the Union addresses of spread lengths.
  Long books matter: perplexity is later evaluated on windows of up to 16k tokens. Changing a
  document's size can move documents of its family between the splits.

Documents are listed, sorted by relative path; their text is read only when needed
(:meth:`Document.read_text`), so listing PG-19 (11 GB) is instant. Zero-byte files are skipped.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

VALIDATION_FRACTION = 0.05  # plain folder: share of each family's documents that go to validation
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
    # the inode's change time: any write changes it, and unlike the modification time no program can
    # set it back (an edit that keeps the size and restores the mtime changes it)
    ctime_ns: int = 0

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
        """A short hash of a split's document names, sizes, modification and change times (the cache
        key: a document written since is read again, whatever its size and modification time say)."""
        h = hashlib.sha256()
        for doc in self.splits[split]:
            h.update(f"{doc.name}\0{doc.size}\0{doc.mtime_ns}\0{doc.ctime_ns}\n".encode())
        return h.hexdigest()[:16]


def read_corpus(root: str | Path, validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
    """List a corpus folder and split it by document.

    Args:
        root: a PG-19 style folder (``train/``, ``validation/``, optional ``test/``) or any folder of
            ``.txt`` documents (searched recursively).
        validation_fraction: plain folders only: the share of each family's documents that go to the
            validation split (see the module docstring). Both splits get at least one document.

    Returns:
        A :class:`Corpus` with splits ``train``, ``validation`` (and ``test`` for PG-19 when present).

    Raises:
        CorpusError: the folder is missing, holds no ``.txt`` files, holds only empty ones, or (plain
            folder) holds a single document, which cannot be split.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise CorpusError(f"corpus folder {root} {what}: pass a folder of .txt documents")
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
    return Corpus(root, "folder", split_documents(docs, validation_fraction))


def _list_documents(folder: Path, root: Path) -> list[Document]:
    paths = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not paths:
        raise CorpusError(f"no .txt files found under {folder}: put the documents there as UTF-8 .txt files")
    docs = []
    for p in paths:
        st = p.stat()
        if st.st_size > 0:
            docs.append(
                Document(p.relative_to(root).as_posix(), p, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            )
    if not docs:
        raise CorpusError(f"all {len(paths)} .txt files under {folder} are empty: add some text")
    docs.sort(key=lambda d: d.name)
    return docs


def document_family(name: str) -> str:
    """The family of a document's relative path: its first folder, else its file name up to ``_``."""
    if "/" in name:
        return name.split("/", 1)[0] + "/"
    stem = name.rsplit(".", 1)[0]
    return stem.split("_", 1)[0]


def split_documents(docs: list[Document], fraction: float = VALIDATION_FRACTION) -> dict[str, list[Document]]:
    """Split documents into ``train`` and ``validation`` by the stratified rule of the module docstring.

    Args:
        docs: at least two documents.
        fraction: the share of each family's documents that go to validation, in (0, 1).

    Returns:
        ``{"train": [...], "validation": [...]}``, each sorted by name, both non-empty.
    """
    if not 0.0 < fraction < 1.0:
        raise CorpusError(f"validation_fraction must be in (0, 1); got {fraction}")
    families: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        families[document_family(d.name)].append(d)
    pooled = [d for members in families.values() if len(members) == 1 for d in members]
    groups = [members for members in families.values() if len(members) > 1]
    if pooled:
        groups.append(pooled)
    validation: set[str] = set()
    for members in groups:
        n = len(members)
        if n < 2:
            continue
        ranked = sorted(members, key=lambda d: (-d.size, d.name))
        m = min(n - 1, max(1, round(n * fraction)))
        validation.update(ranked[1 + math.floor(j * (n - 1) / m)].name for j in range(m))
    ordered = sorted(docs, key=lambda d: d.name)
    return {
        "train": [d for d in ordered if d.name not in validation],
        "validation": [d for d in ordered if d.name in validation],
    }
