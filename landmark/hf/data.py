"""A corpus folder as windows of raw tokens of a Hugging Face tokenizer, cached once per tokenizer.

The text of each split (see :func:`landmark.data.read_corpus`) is tokenized with the model's own
tokenizer (no BOS/EOS added, special-token strings in the text kept as text), documents joined by
the tokenizer's eos token, and cached as ``<cache>/hf-tokens/<corpus>-<split>-<key>.npy``; the key
hashes the corpus's and the tokenizer's fingerprints. :class:`TokenWindows` cuts the stream into
consecutive windows of raw tokens for :class:`landmark.hf.LandmarkCollator`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from landmark.data import Corpus, bundled_books, cache_root, read_corpus
from landmark.data.dataset import split_pieces
from landmark.hf.convert import encode_text

DOCS_PER_BATCH = 16  # documents tokenized per call (the fast tokenizer runs a batch in parallel)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's full definition (its ``tokenizer.json``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (
        backend.to_str()
        if backend is not None
        else f"{type(tokenizer).__name__}:{sorted(tokenizer.get_vocab().items())}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenize_corpus(
    tokenizer: Any,
    corpus: str | Path | Corpus | None = None,
    split: str = "train",
    cache: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The raw token stream of one split of a corpus, tokenized once and cached.

    Args:
        tokenizer: a Hugging Face tokenizer (fast); its ``eos_token_id`` separates documents.
        corpus: a corpus folder or a read :class:`~landmark.data.Corpus`; default the bundled books.
        split: ``"train"`` or ``"validation"`` (or ``"test"`` for PG-19).
        cache: the cache root; default :func:`landmark.data.cache_root`.
        progress: show a progress bar while tokenizing.

    Returns:
        (num_tokens,) int32 or int64 array (a memory map of the cached ``.npy``).
    """
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus if corpus is not None else bundled_books())
    if split not in corpus.splits:
        raise ValueError(f"corpus {corpus.root} has no split {split!r}; it has {sorted(corpus.splits)}")
    key = hashlib.sha256(
        f"{corpus.fingerprint(split)}:{tokenizer_fingerprint(tokenizer)}".encode()
    ).hexdigest()
    folder = Path(cache) if cache is not None else cache_root()
    path = folder / "hf-tokens" / f"{corpus.root.name}-{split}-{key[:16]}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    docs = corpus.splits[split]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    with tqdm(
        total=sum(d.size for d in docs),
        unit="B",
        unit_scale=True,
        desc=f"tokenize {split}",
        disable=not progress,
    ) as bar:
        for start in range(0, len(docs), DOCS_PER_BATCH):
            batch = docs[start : start + DOCS_PER_BATCH]
            pieces = [split_pieces(d.read_text()) for d in batch]
            flat = [p for ps in pieces for p in ps if p]
            encoded = iter(encode_text(tokenizer, flat)) if flat else iter(())
            for ps in pieces:
                for p in ps:
                    if p:
                        ids += next(encoded)
                if eos is not None:
                    ids.append(eos)
            bar.update(sum(d.size for d in batch))
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    array = np.asarray(ids, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    try:
        np.save(tmp, array)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


class TokenWindows(torch.utils.data.Dataset):
    """Consecutive windows of ``raw_tokens`` tokens of a stream (each overlapping the next by one token,
    the last token of a window being only a target).

    ``window[i] = {"input_ids": tokens[i * (raw_tokens - 1) : i * (raw_tokens - 1) + raw_tokens]}`` as a
    (raw_tokens,) int64 tensor, for :class:`landmark.hf.LandmarkCollator`.
    """

    def __init__(self, tokens: np.ndarray, raw_tokens: int, limit: int | None = None) -> None:
        if raw_tokens < 2:
            raise ValueError(f"raw_tokens must be >= 2; got {raw_tokens}")
        self.tokens, self.raw_tokens = tokens, raw_tokens
        count = max(0, (len(tokens) - 1) // (raw_tokens - 1))
        self.count = count if limit is None else min(count, limit)
        if self.count == 0:
            raise ValueError(
                f"the token stream ({len(tokens)} tokens) is shorter than one window of {raw_tokens}"
            )

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        start = i * (self.raw_tokens - 1)
        return {
            "input_ids": torch.from_numpy(
                np.asarray(self.tokens[start : start + self.raw_tokens], dtype=np.int64)
            )
        }
