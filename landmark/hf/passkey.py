"""The passkey task (docs/method.md) with a Hugging Face tokenizer: the fine-tuning mix.

The prompt text and the sampling of training examples are those of :mod:`landmark.data.passkey`
(:class:`~landmark.data.passkey.PasskeyPrompts`); :class:`HFTokenEncoder` only gives it a Hugging Face
tokenizer's ``encode`` (no BOS/EOS, special-token strings kept as text). Lengths are in tokens of that
tokenizer, landmarks not included.

* :class:`PasskeyMixWindows`: a fine-tuning dataset that replaces a seeded fraction of the corpus
  windows with in-window passkey samples (the key at least one block before the question).

The evaluation is the library's one passkey evaluation for every model family: ``landmark eval passkey
--model NAME=hf:FOLDER`` (:mod:`landmark.eval.passkey`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from landmark.data.passkey import ChatTurns, PasskeyPrompts
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


def check_passkey_windows(
    tokenizer: Any, raw_tokens: int, block_size: int, wordings: str = "paper", chat: bool = False
) -> PasskeyPrompts:
    """The prompt builder, once windows of ``raw_tokens`` are known to hold a passkey sample whose key
    lies at least one block (``block_size - 1`` tokens) before the question, in every family of
    ``wordings`` (``"paper"`` or ``"train"``), in plain text and (``chat``) in the chat template.

    Raises:
        ValueError: the windows are too short (the message names ``--max-length``).
    """
    prompts = hf_passkey_prompts(tokenizer)
    longest = hf_passkey_prompts(tokenizer, chat=True) if chat else prompts
    need = max(prompts.min_sample(wordings), longest.min_sample(wordings)) + block_size - 1
    if raw_tokens < need:
        raise ValueError(
            f"passkey samples need windows of at least {need} tokens with this tokenizer and block size; "
            f"the windows hold {raw_tokens}: use a longer --max-length or --passkey-fraction 0"
        )
    return prompts


class Variant(NamedTuple):
    """The kind of one passkey training sample (:meth:`PasskeyMixWindows.variant`)."""

    prose: bool  # filler from the training split's prose (else the repeated sentences)
    keys: int  # named keys in the window (1: the paper's one unnamed key)
    near: bool  # the asked key may lie right before the question (no one-block gap)
    chat: bool = False  # the sample in the tokenizer's chat template (the answer opens the reply)


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
        books: share of the passkey samples whose filler is prose of the corpus's training split
            (``haystack``, a :class:`~landmark.data.passkey.BookHaystack`) instead of the repeated
            sentences (what ``landmark eval passkey --haystack books`` asks, on the validation split).
        multikey: share of the passkey samples with 2 to ``MAX_TRAINING_KEYS`` named keys, one asked
            (``--task multikey``).
        near: share of the passkey samples whose asked key may lie anywhere before the question, in
            its own block or right before it too (no ``block_size - 1`` gap): what ``landmark eval
            passkey`` asks at depth 1, where the key is in the local context, not in a retrieved block.
        wordings: ``"paper"`` (the paper's key sentence and question, the default) or ``"train"``: each
            passkey sample in a training wording family (:mod:`landmark.data.wordings`), never a
            held-out one, drawn with the sample's key.
        chat: share of the passkey samples in the tokenizer's chat template (:func:`chat_turns`): the
            instruction, filler, key sentences and question are the user's message, the answer prefix
            and the value the assistant's reply (the way an instruct model is asked).
    """

    MAX_TRAINING_KEYS = 6

    def __init__(
        self,
        base: Any,
        tokenizer: Any,
        raw_tokens: int,
        block_size: int,
        fraction: float,
        seed: int = 0,
        books: float = 0.0,
        multikey: float = 0.0,
        haystack: Any = None,
        near: float = 0.0,
        wordings: str = "paper",
        chat: float = 0.0,
    ) -> None:
        shares = (("passkey_fraction", fraction), ("books", books), ("multikey", multikey), ("near", near),
                  ("chat", chat))  # fmt: skip
        for name, value in shares:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if books and haystack is None:
            raise ValueError("books > 0 needs a haystack (BookHaystack of the training split)")
        self.base, self.raw_tokens, self.fraction, self.seed = base, raw_tokens, fraction, seed
        self.books, self.multikey, self.near, self.chat = books, multikey, near, chat
        self.prompts = check_passkey_windows(tokenizer, raw_tokens, block_size, wordings, chat=bool(chat))
        self.wordings = wordings
        self.book_prompts = PasskeyPrompts(self.prompts.tokenizer, haystack) if books else None
        turns = chat_turns(tokenizer) if chat else None
        self.chat_prompts = {  # (prose, chat) -> the builder
            (prose, True): PasskeyPrompts(self.prompts.tokenizer, haystack if prose else None, chat=turns)
            for prose in ((False, True) if books else (False,))
        } if chat else {}  # fmt: skip
        self.min_gap = block_size - 1

    def __len__(self) -> int:
        return len(self.base)

    def is_passkey(self, i: int) -> bool:
        """Whether window ``i`` is a passkey sample."""
        return bool(np.random.default_rng([self.seed, i, 7919]).random() < self.fraction)

    def variant(self, i: int) -> Variant:
        """The kind of passkey sample ``i``, from its own seeded stream (so that with every share 0 the
        samples are those of the paper's recipe, and a share added later leaves the earlier draws)."""
        if not (self.books or self.multikey or self.near or self.chat):
            return Variant(False, 1, False)
        rng = np.random.default_rng([self.seed, i, 15485863])
        prose, several = rng.random() < self.books, rng.random() < self.multikey
        keys = int(rng.integers(2, self.MAX_TRAINING_KEYS + 1)) if several else 1
        near = bool(self.near and rng.random() < self.near)
        chat = bool(self.chat and rng.random() < self.chat)  # drawn last: the earlier draws stay
        return Variant(bool(prose), keys, near, chat)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.is_passkey(i):
            return self.base[i]
        prose, keys, near, chat = self.variant(i)
        prompts = self.chat_prompts[(prose, True)] if chat else self.book_prompts if prose else self.prompts
        gap = 0 if near else self.min_gap
        rng = np.random.default_rng([self.seed, i, 104729])
        try:
            ids = prompts.training_sample(rng, self.raw_tokens, gap, keys=keys, wordings=self.wordings)
        except ValueError:  # too many keys for the window: a one-key sample
            ids = prompts.training_sample(np.random.default_rng([self.seed, i, 104729]), self.raw_tokens,
                                          gap, wordings=self.wordings)  # fmt: skip
        return {"input_ids": torch.tensor(ids, dtype=torch.long)}
