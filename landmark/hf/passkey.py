"""The passkey task (shared/method.md s.6) with a Hugging Face tokenizer: training mix and evaluation.

The prompt text and the sampling of training examples are those of :mod:`landmark.data.passkey`
(:class:`~landmark.data.passkey.PasskeyPrompts`); :class:`HFTokenEncoder` only gives it a Hugging Face
tokenizer's ``encode`` (no BOS/EOS, special-token strings kept as text). Lengths are in tokens of that
tokenizer, landmarks not included.

* :class:`PasskeyMixWindows`: a fine-tuning dataset that replaces a seeded fraction of the corpus
  windows with in-window passkey samples (the key at least one block before the question).
* :func:`passkey_trial`: one prompt, one greedy answer, scored with
  :func:`~landmark.data.passkey.first_integer`; with a landmark model it runs
  :func:`landmark.hf.generate` (with or without retrieval), with any other model plain greedy decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from landmark.data.passkey import KEY_RANGE, PasskeyPrompts, first_integer
from landmark.hf.convert import encode_text


class HFTokenEncoder:
    """The ``encode`` that :class:`~landmark.data.passkey.PasskeyPrompts` needs, from a HF tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: no special tokens added, special-token strings encoded as text."""
        return encode_text(self.tokenizer, text)


def hf_passkey_prompts(tokenizer: Any) -> PasskeyPrompts:
    """:class:`~landmark.data.passkey.PasskeyPrompts` over a Hugging Face tokenizer."""
    return PasskeyPrompts(HFTokenEncoder(tokenizer))  # type: ignore[arg-type]


def check_passkey_windows(tokenizer: Any, raw_tokens: int, block_size: int) -> PasskeyPrompts:
    """The prompt builder, once windows of ``raw_tokens`` are known to hold a passkey sample whose key
    lies at least one block (``block_size - 1`` tokens) before the question.

    Raises:
        ValueError: the windows are too short (the message names ``--max-length``).
    """
    prompts = hf_passkey_prompts(tokenizer)
    need = prompts.min_length() + len(prompts.answer(KEY_RANGE[1] - 1)) + block_size - 1
    if raw_tokens < need:
        raise ValueError(
            f"passkey samples need windows of at least {need} tokens with this tokenizer and block size; "
            f"the windows hold {raw_tokens}: use a longer --max-length or --passkey-fraction 0"
        )
    return prompts


class PasskeyMixWindows(torch.utils.data.Dataset):
    """Corpus windows with a seeded fraction replaced by passkey samples of the same length.

    Args:
        base: a dataset of ``{"input_ids": (raw_tokens,) int64}`` windows (:class:`landmark.hf.data.
            TokenWindows`).
        tokenizer: the model's tokenizer.
        raw_tokens: tokens per window (the collator's raw length: regular tokens + 1 target).
        block_size: positions per block; the key sentence ends at least ``block_size - 1`` tokens before
            the question, so that it lies in an earlier block and is reached through its landmark.
        fraction: share of windows replaced (0..1); which ones, and their keys, depend only on
            ``(seed, index)``.
    """

    def __init__(
        self, base: Any, tokenizer: Any, raw_tokens: int, block_size: int, fraction: float, seed: int = 0
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"passkey_fraction must be in [0, 1]; got {fraction}")
        self.base, self.raw_tokens, self.fraction, self.seed = base, raw_tokens, fraction, seed
        self.prompts = check_passkey_windows(tokenizer, raw_tokens, block_size)
        self.min_gap = block_size - 1

    def __len__(self) -> int:
        return len(self.base)

    def is_passkey(self, i: int) -> bool:
        """Whether window ``i`` is a passkey sample."""
        return bool(np.random.default_rng([self.seed, i, 7919]).random() < self.fraction)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.is_passkey(i):
            return self.base[i]
        rng = np.random.default_rng([self.seed, i, 104729])
        ids = self.prompts.training_sample(rng, self.raw_tokens, self.min_gap)
        return {"input_ids": torch.tensor(ids, dtype=torch.long)}


@dataclass
class PasskeyResult:
    """One passkey trial."""

    length: int  # prompt tokens (landmarks not counted)
    depth: float  # where the key sentence sits (0 = start, 1 = just before the question)
    key: int
    answer: str  # the decoded generation
    correct: bool  # first integer of the answer == key
    seconds: float  # wall time of the trial (prefill + decoding)


@torch.no_grad()
def passkey_trial(
    model: Any,
    tokenizer: Any,
    length: int,
    depth: float,
    key: int,
    *,
    retrieval: Any = None,
    max_new_tokens: int = 8,
    prompts: PasskeyPrompts | None = None,
    **cache_kwargs: Any,
) -> PasskeyResult:
    """Build a passkey prompt of ``length`` tokens, decode greedily, score the first integer.

    Args:
        model: a landmark model (decoded with :func:`landmark.hf.generate`, landmarks inserted) or any
            causal LM (greedy decoding with its own attention and a ``DynamicCache``).
        retrieval: for a landmark model, a :class:`landmark.inference.RetrievalConfig` (top-k retrieval
            through a :class:`landmark.hf.LandmarkRetrievalCache`) or None (the whole context).
        max_new_tokens: tokens generated (a five-digit key is 1-3 tokens).
        prompts: the prompt builder (made from the tokenizer when None).
        **cache_kwargs: with ``retrieval``, options of :class:`landmark.hf.LandmarkRetrievalCache`
            (``chunk_len``, ``memory_device``, ...); ignored otherwise.
    """
    from landmark.hf.generate import generate

    prompts = prompts if prompts is not None else hf_passkey_prompts(tokenizer)
    ids = torch.tensor(prompts.prompt(length, depth, key), dtype=torch.long)
    start = time.perf_counter()
    if getattr(model.config, "landmark_token_id", None) is not None:
        options = cache_kwargs if retrieval is not None else {}
        answer, _ = generate(model, tokenizer, ids, max_new_tokens, retrieval=retrieval, **options)
    else:
        answer = _greedy(model, tokenizer, ids, max_new_tokens)
    seconds = time.perf_counter() - start
    return PasskeyResult(length, depth, key, answer, first_integer(answer) == key, round(seconds, 1))


def _greedy(model: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy decoding of a plain causal LM with its own attention (a ``DynamicCache``), through the
    library's one generation loop."""
    from transformers import DynamicCache

    from landmark.hf.generate import hf_reader
    from landmark.inference.generate import generate_with

    eos = tokenizer.eos_token_id
    new = generate_with(
        hf_reader(model, DynamicCache(config=model.config)), [ids.tolist()], max_new_tokens,
        block_size=0, landmark_id=None, stop_ids=() if eos is None else (eos,),
    )[0]  # fmt: skip
    return tokenizer.decode(new, skip_special_tokens=True)
