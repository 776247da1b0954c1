"""Tokenise a corpus once into memory-mapped token arrays, cached and written atomically.

``prepare_data`` turns a corpus folder into, in one output folder::

    tokenizer.json          the tokenizer (trained on the train split, or GPT-2)
    tokenizer.source.json   what the trained tokenizer was made from (its cache key)
    train.bin, train.json   the train split: raw token ids, and their description
    validation.bin, ...     likewise for every other split

A ``.bin`` is the split's documents, each followed by ``<|endoftext|>``, as a flat array of uint16
(vocabulary <= 65536) or uint32. Its ``.json`` records the dtype, the token count, each document's
start offset and name, and the tokenizer's and the corpus's fingerprints. A split whose ``.json``
matches the current tokenizer and corpus is reused as it is; otherwise it is tokenised again. Every
file is written to a temporary name and renamed into place, so a crash leaves no partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from landmark.data.books import bundled_books, cache_root
from landmark.data.corpus import Corpus, CorpusError, Document, read_corpus
from landmark.data.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer
from landmark.files import first_line, missing_folders, remove_empty_folders, write_json_atomic

FORMAT = "landmark-tokens-v1"
TEMPORARY_ARRAY = re.compile(r"\.[^/]+\.tmp(\d+)")  # .<split>.bin.tmp<pid>: an array being written
BATCH_CHARS = 1 << 21  # text tokenised per call to the (multi-threaded) batch encoder
PIECE_CHARS = 1 << 16  # long documents are cut into pieces of about this size for parallelism
# A cut between "X\n" and "Y" (X, Y not whitespace) never changes byte-level BPE tokens: GPT-2's
# pre-tokeniser ends a word before "\n" and starts the next one at Y either way.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


@dataclass(frozen=True)
class TokenSplit:
    """One tokenised split: a read-only memory map of its tokens, and its description."""

    tokens: np.ndarray  # (num_tokens,) uint16 or uint32, documents separated by eot
    doc_starts: np.ndarray  # (num_documents,) int64 offset of each document's first token
    documents: list[str]  # (num_documents,) names relative to the corpus root
    meta: dict = field(repr=False)  # the .json file as written

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class PreparedData:
    """The result of :func:`prepare_data`."""

    folder: Path
    tokenizer: Tokenizer
    splits: dict[str, TokenSplit]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``piece_chars`` at newlines where the cut cannot change the
    tokens (``"".join(pieces) == text`` and their encodings concatenate to the encoding of ``text``)."""
    pieces, start = [], 0
    while len(text) - start > 2 * piece_chars:
        cut = _SAFE_CUT.search(text, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def _batches(docs: Sequence[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += doc.size
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _replace_json(path: Path, obj: dict) -> None:
    write_json_atomic(path, obj, indent=None)


def _encode_documents(
    docs: Sequence[Document], tokenizer: Tokenizer
) -> tuple[list[str], list[int], list[int]]:
    """Names, start offsets and token ids (each document followed by eot) of the non-empty ``docs``."""
    texts = [(d.name, t) for d in docs if (t := d.read_text()).strip()]
    pieces = [split_pieces(t) for _, t in texts]
    encoded = iter(tokenizer.encode_batch([p for ps in pieces for p in ps]))
    starts, ids = [], []
    for ps in pieces:
        starts.append(len(ids))
        for _ in ps:
            ids += next(encoded)
        ids.append(tokenizer.eot_id)
    return [name for name, _ in texts], starts, ids


def tokenize_split(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    path: str | Path,
    corpus_fingerprint: str,
    progress: bool = True,
) -> TokenSplit:
    """Tokenise documents into ``path`` (``<split>.bin``) and ``<split>.json``, atomically.

    Args:
        docs: the split's documents, in order. Whitespace-only documents are skipped.
        tokenizer: encodes the text; its ``eot_id`` follows every document.
        path: the ``.bin`` file to write; the ``.json`` goes beside it.
        corpus_fingerprint: recorded in the ``.json`` (see :meth:`Corpus.fingerprint`).
        progress: show a tqdm progress bar (bytes of text).

    Returns:
        The written split, memory-mapped.

    Raises:
        CorpusError: a document is not UTF-8, or every document is empty. No file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    meta_path = path.with_suffix(".json")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # (TEMPORARY_ARRAY)
    doc_starts, names, offset = [], [], 0
    try:
        with (
            open(tmp, "wb") as f,
            tqdm(
                total=sum(d.size for d in docs),
                unit="B",
                unit_scale=True,
                desc=f"tokenize {path.stem}",
                disable=not progress,
            ) as bar,
        ):
            for batch in _batches(docs):
                batch_names, starts, ids = _encode_documents(batch, tokenizer)
                names += batch_names
                doc_starts += [offset + s for s in starts]
                f.write(np.asarray(ids, dtype=dtype).tobytes())  # a full disk raises with its errno
                offset += len(ids)
                bar.update(sum(d.size for d in batch))
        if not names:
            raise CorpusError(f"every document of split {path.stem!r} is empty or whitespace: add some text")
        meta_path.unlink(missing_ok=True)  # never pair an old description with a new array
        tmp.replace(path)
    except OSError as err:  # named after the array, not its temporary file (which goes)
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "split": path.stem,
        "dtype": dtype.name,
        "num_tokens": offset,
        "num_documents": len(names),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "landmark_id": tokenizer.landmark_id,
        "tokenizer": tokenizer.fingerprint,
        "corpus": corpus_fingerprint,
        "doc_starts": doc_starts,
        "documents": names,
    }
    _replace_json(meta_path, meta)
    return load_split(path.parent, path.stem)


def load_split(folder: str | Path, split: str) -> TokenSplit:
    """Memory-map ``<folder>/<split>.bin`` as described by ``<folder>/<split>.json``.

    Raises:
        FileNotFoundError: the split was not prepared; ValueError: the files do not match.
    """
    folder = Path(folder)
    meta_path, bin_path = folder / f"{split}.json", folder / f"{split}.bin"
    if not meta_path.is_file() or not bin_path.is_file():
        raise FileNotFoundError(f"split {split!r} is not prepared in {folder}: run prepare_data first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])
    if meta.get("format") != FORMAT or bin_path.stat().st_size != meta["num_tokens"] * dtype.itemsize:
        raise ValueError(f"{bin_path} does not match {meta_path}: delete both and prepare again")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    return TokenSplit(tokens, np.asarray(meta["doc_starts"], dtype=np.int64), meta["documents"], meta)


def _check_documents(corpus: Corpus, folder: Path) -> None:
    """Every document of the splits ``folder`` has not tokenized yet decodes as UTF-8, before anything is
    written (a bad file found while tokenizing the last split left the first ones behind).

    Raises:
        CorpusError: naming the first file that is not UTF-8 and the offset of its bad byte.
    """
    for name, docs in corpus.splits.items():
        try:
            recorded = json.loads((folder / f"{name}.json").read_text(encoding="utf-8")).get("corpus")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != corpus.fingerprint(name):  # documents read before were decoded then
            for doc in docs:
                doc.read_text()


def _cached_split(folder: Path, split: str, tokenizer: Tokenizer, corpus_fp: str) -> TokenSplit | None:
    try:
        cached = load_split(folder, split)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        return None
    ok = cached.meta["tokenizer"] == tokenizer.fingerprint and cached.meta["corpus"] == corpus_fp
    return cached if ok else None


def _bpe_tokenizer(corpus: Corpus, folder: Path, vocab_size: int, progress: bool) -> Tokenizer:
    """The BPE tokenizer of ``folder`` if it was trained on this train split, else a new one."""
    source = {"kind": "bpe", "vocab_size": vocab_size, "corpus": corpus.fingerprint("train")}
    source_path = folder / "tokenizer.source.json"
    try:
        same = json.loads(source_path.read_text(encoding="utf-8")) == source
    except (OSError, ValueError):  # missing, unreadable or written by another version: train again
        same = False
    if same:
        try:
            return Tokenizer.load(folder)
        except Exception as err:  # the tokenizers library's own error type: a damaged file
            print(f"warning: {folder / 'tokenizer.json'} is damaged ({first_line(err)}): training it again",
                  file=sys.stderr, flush=True)  # fmt: skip
    elif progress and (folder / "tokenizer.json").is_file():  # prepared before with other settings
        print(f"note: {folder} was prepared with another tokenizer or corpus: replacing it", flush=True)
    if progress:
        print(f"training a {vocab_size}-token BPE on {len(corpus.splits['train'])} documents ...", flush=True)
    tokenizer = Tokenizer.train((d.read_text() for d in corpus.splits["train"]), vocab_size)
    source_path.unlink(missing_ok=True)
    tokenizer.save(folder)
    _replace_json(source_path, source)
    return tokenizer


def _has_tokenizer(folder: Path, tokenizer: Tokenizer) -> bool:
    try:
        return Tokenizer.load(folder).fingerprint == tokenizer.fingerprint
    except Exception:  # missing or unreadable
        return False


def default_prepared_folder(corpus: Corpus, tokenizer: str | Tokenizer, vocab_size: int) -> Path:
    """``<cache>/prepared/<corpus folder name>-<hash of its path>-<tokenizer>``."""
    where = hashlib.sha256(str(corpus.root.resolve()).encode()).hexdigest()[:8]
    if isinstance(tokenizer, Tokenizer):  # keyed by the tokenizer itself: two custom ones never share
        kind = f"custom-{tokenizer.fingerprint[:12]}"
    else:
        kind = f"bpe{vocab_size}" if tokenizer == "bpe" else "gpt2"
    return cache_root() / "prepared" / f"{corpus.root.name}-{where}-{kind}"


PREPARED_FILES = ("tokenizer.json", "tokenizer.source.json")  # besides <split>.bin and <split>.json


class PreparedFolderError(CorpusError):
    """The folder given for prepared data holds other files (a model's, a checkpoint's): nothing is
    written there."""


def prepare_error_line(err: ValueError, prefixes: dict[str, str]) -> str:
    """A ValueError of :func:`prepare_data` as one line naming the caller's option behind it: ``prefixes``
    maps ``"folder"``, ``"corpus"`` and ``"gpt2_dir"`` to what the caller puts before the message
    (``"--out "``, ``"data.corpus: "``, ...). A PreparedFolderError is about the folder, a CorpusError
    about the corpus, any other about the GPT-2 BPE files (the callers check the other settings first)."""
    if isinstance(err, PreparedFolderError):
        return prefixes["folder"] + str(err)
    return prefixes["corpus" if isinstance(err, CorpusError) else "gpt2_dir"] + str(err)


def check_prepared_folder(folder: Path) -> None:
    """``folder`` may receive prepared data: it does not exist, or holds nothing but prepared data (a
    tokenizer and token arrays); a model's or a checkpoint's folder, or any other file, is a CorpusError
    naming what it holds (a PreparedFolderError: preparing there would replace its tokenizer.json)."""
    if not folder.is_dir():
        return
    ours = re.compile(rf"(tokenizer(\.source)?\.json|[^/]+\.(bin|json)|{TEMPORARY_ARRAY.pattern})")
    foreign = sorted(p.name for p in folder.iterdir() if not ours.fullmatch(p.name) or p.is_dir())
    arrays = {p.stem for p in folder.glob("*.bin")}
    meta = [p.name for p in folder.glob("*.json") if p.name not in PREPARED_FILES and p.stem not in arrays]
    # arrays without a tokenizer or their descriptions beside them are not ours (prepare writes the
    # tokenizer first, then each array and its description)
    prepared = (folder / "tokenizer.json").is_file()
    lone = [f"{stem}.bin" for stem in arrays if not prepared and not (folder / f"{stem}.json").is_file()]
    foreign = sorted(foreign + meta + lone)
    if foreign:
        raise PreparedFolderError(
            f"{folder} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, not prepared data "
            "(a tokenizer and token arrays): choose an empty or new folder"
        )


def prepare_data(
    corpus: str | Path | Corpus | None = None,
    folder: str | Path | None = None,
    tokenizer: str | Tokenizer = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    gpt2_dir: str | Path | None = None,
    progress: bool = True,
) -> PreparedData:
    """Tokenise every split of a corpus into memory-mapped arrays (reusing what is already there).

    Args:
        corpus: a corpus folder (see :func:`read_corpus`) or a read :class:`Corpus`; default the bundled
            books (:func:`bundled_books`).
        folder: where to write; default :func:`default_prepared_folder` under the cache.
        tokenizer: ``"bpe"`` (train on the train split, or reuse the one in ``folder``), ``"gpt2"``
            (from ``gpt2_dir``, default ``<cache>/gpt2``), or a :class:`Tokenizer`.
        vocab_size: the size of a trained BPE, special tokens included.
        gpt2_dir: the folder of ``encoder.json`` and ``vocab.bpe``.
        progress: print what is being done and show progress bars.

    Returns:
        The folder, the tokenizer (also saved there as tokenizer.json) and every split, memory-mapped.

    Raises:
        PreparedFolderError: ``folder`` holds files other than prepared data (:func:`check_prepared_folder`).
    """
    if folder is not None:  # (before the corpus is read)
        check_prepared_folder(Path(folder))
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus if corpus is not None else bundled_books())
    if folder is None:
        folder = default_prepared_folder(corpus, tokenizer, vocab_size)
        check_prepared_folder(folder)
    folder = Path(folder)
    _check_documents(corpus, folder)
    if tokenizer == "gpt2":  # read before the folder is made: damaged files leave nothing behind
        tok = Tokenizer.gpt2(gpt2_dir if gpt2_dir is not None else cache_root() / "gpt2")
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer != "bpe":
        raise ValueError(f"tokenizer must be 'bpe', 'gpt2' or a Tokenizer; got {tokenizer!r}")
    made = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(folder)
        if tokenizer == "bpe":
            tok = _bpe_tokenizer(corpus, folder, vocab_size, progress)
        return PreparedData(folder, tok, _prepared_splits(corpus, folder, tok, tokenizer == "bpe", progress))
    except BaseException:  # an error or Ctrl-C before anything was written: no empty folder made is left
        remove_empty_folders(made)
        raise


def _remove_dead_temporaries(folder: Path) -> None:
    """Remove the temporary arrays (``.<split>.bin.tmp<pid>``) of preparations that were killed: those
    whose process no longer runs (a preparation running beside this one keeps its own)."""
    for tmp in folder.glob(".*.tmp*"):
        found = TEMPORARY_ARRAY.fullmatch(tmp.name)
        if found is None or not tmp.is_file():
            continue
        try:
            os.kill(int(found.group(1)), 0)  # (signal 0: only whether the process exists)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OverflowError, ValueError):  # another user's process, or no pid
            pass


def _prepared_splits(
    corpus: Corpus, folder: Path, tok: Tokenizer, trained_here: bool, progress: bool
) -> dict[str, TokenSplit]:
    """Every split of ``corpus`` tokenized into ``folder`` (reused where cached), the tokenizer saved."""
    if not trained_here and not _has_tokenizer(folder, tok):
        (folder / "tokenizer.source.json").unlink(missing_ok=True)  # not a BPE trained here any more
        tok.save(folder)
    splits = {}
    for name, docs in corpus.splits.items():
        fp = corpus.fingerprint(name)
        cached = _cached_split(folder, name, tok, fp)
        if cached is None:
            cached = tokenize_split(docs, tok, folder / f"{name}.bin", fp, progress)
        splits[name] = cached
    return splits
