"""The passkey task (docs/method.md) with a Hugging Face tokenizer: the fine-tuning mix.

The prompt text and the sampling of training examples are those of :mod:`landmark.data.passkey`
(:class:`~landmark.data.passkey.PasskeyPrompts`); :class:`HFTokenEncoder` only gives it a Hugging Face
tokenizer's ``encode`` (no BOS/EOS, special-token strings kept as text). Lengths are in tokens of that
tokenizer, landmarks not included.

* :class:`PasskeyMixWindows`: a fine-tuning dataset that replaces a seeded share of the corpus
  windows with in-window passkey samples (:class:`~landmark.data.passkey.PasskeyMix`, the options of
  both model families; far keys at least one block before the question).

The evaluation is the library's one passkey evaluation for every model family: ``landmark eval passkey
--model NAME=hf:FOLDER`` (:mod:`landmark.eval.passkey`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from landmark.data.passkey import (
    EXTRA_STREAM,
    PASSKEY_STREAM,
    VARIANT_STREAM,
    BookHaystack,
    ChatTurns,
    PasskeyMix,
    PasskeyPrompts,
    PasskeySamples,
    PasskeyVariant,
    window_need,
)
from landmark.hf.convert import encode_text

_SPLIT = "\u2063LANDMARK-MESSAGE\u2063"  # a user message no template rewrites, to find where it goes


class HFTokenEncoder:
    """The ``encode`` that :class:`~landmark.data.passkey.PasskeyPrompts` needs, from a HF tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: no special tokens added, special-token strings encoded as text."""
        return encode_text(self.tokenizer, text)


def hf_passkey_prompts(tokenizer: Any, chat: bool = False) -> PasskeyPrompts:
    """:class:`~landmark.data.passkey.PasskeyPrompts` over a Hugging Face tokenizer (``chat``: in its
    chat template, :func:`chat_turns`)."""
    turns = chat_turns(tokenizer) if chat else None
    return PasskeyPrompts(HFTokenEncoder(tokenizer), chat=turns)  # type: ignore[arg-type]


def chat_turns(tokenizer: Any) -> ChatTurns:
    """The tokens the tokenizer's chat template puts before a user message (its default system turn
    included) and between the message and the assistant's reply.

    Raises:
        ValueError: the tokenizer has no chat template, or its template does not keep the message whole.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--passkey-chat: the model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SPLIT}], add_generation_prompt=True, tokenize=False
    )
    if text.count(_SPLIT) != 1:
        raise ValueError("--passkey-chat: the tokenizer's chat template does not keep the user message whole")
    before, after = text.split(_SPLIT)
    encode = lambda t: tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else ()  # noqa: E731
    return ChatTurns(encode(before), encode(after))


def check_passkey_windows(tokenizer: Any, raw_tokens: int, block_size: int, mix: PasskeyMix) -> None:
    """Windows of ``raw_tokens`` hold a sample of ``mix`` (:func:`~landmark.data.passkey.window_need`)
    whose keys lie at least one block (``block_size - 1`` tokens) before their questions, in every family
    of ``mix.wordings``, in plain text and (``mix.chat``) in the chat template.

    Raises:
        ValueError: the windows are too short (the message names ``--max-length``).
    """
    builders = [
        hf_passkey_prompts(tokenizer),
        *([hf_passkey_prompts(tokenizer, chat=True)] if mix.chat else []),
    ]
    need = window_need(builders, mix, block_size - 1)
    if raw_tokens < need:
        raise ValueError(
            f"passkey samples ({mix.pairs} pair(s)) need windows of at least {need} tokens with this "
            f"tokenizer and block size; the windows hold {raw_tokens}: use a longer --max-length, fewer "
            "--passkey-pairs or --passkey-fraction 0"
        )


class PasskeyMixWindows(torch.utils.data.Dataset):
    """Corpus windows with a seeded share replaced by passkey samples of the same length: the passkey mix
    (:class:`~landmark.data.passkey.PasskeyMix`) of the from-scratch models, in the Hugging Face
    tokenizer's ids, through the same sampling core (:class:`~landmark.data.passkey.PasskeySamples`).

    Args:
        base: a dataset of ``{"input_ids": (raw_tokens,) int64}`` windows (:class:`landmark.hf.data.
            TokenWindows`).
        tokenizer: the model's tokenizer (``mix.chat``: its chat template, :func:`chat_turns`).
        raw_tokens: tokens per window (the collator's raw length: regular tokens + 1 target).
        block_size: positions per block; a far key sentence ends at least ``block_size - 1`` tokens
            before its question, so that it lies in an earlier block and is reached through its landmark.
        mix: the options; which windows become samples, of which variant, and their keys depend only
            on ``(seed, index)``.
        seed: the run's seed.
        haystack: the training split's prose (a :class:`~landmark.data.passkey.BookHaystack`), for
            ``mix.books`` (what ``landmark eval passkey --haystack books`` asks, on the validation split).
    """

    def __init__(
        self,
        base: Any,
        tokenizer: Any,
        raw_tokens: int,
        block_size: int,
        mix: PasskeyMix,
        seed: int = 0,
        haystack: BookHaystack | None = None,
    ) -> None:
        check_passkey_windows(tokenizer, raw_tokens, block_size, mix)
        turns = chat_turns(tokenizer) if mix.chat else None
        self.samples = PasskeySamples(HFTokenEncoder(tokenizer), mix, haystack, turns)  # type: ignore[arg-type]
        self.base, self.raw_tokens, self.mix, self.seed = base, raw_tokens, mix, seed
        self.min_gap = block_size - 1

    def __len__(self) -> int:
        return len(self.base)

    def is_passkey(self, i: int) -> bool:
        """Whether window ``i`` is a passkey sample."""
        return bool(np.random.default_rng([self.seed, i, PASSKEY_STREAM]).random() < self.mix.share)

    def variant(self, i: int) -> PasskeyVariant:
        """The kind of passkey sample ``i`` (:meth:`~landmark.data.passkey.PasskeyMix.variant`), from its
        own seeded stream."""
        return self.mix.variant(np.random.default_rng([self.seed, i, VARIANT_STREAM]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.is_passkey(i):
            return self.base[i]
        rng = np.random.default_rng([self.seed, i, EXTRA_STREAM])
        ids = self.samples.sample(rng, self.variant(i), self.raw_tokens, self.min_gap)
        return {"input_ids": torch.tensor(ids, dtype=torch.long)}
