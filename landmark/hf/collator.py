"""Batches for fine-tuning a converted model: landmarks inserted, targets that skip them.

transformers' causal-LM loss normally shifts ``labels`` by one (``logits[t]`` is scored against
``labels[t + 1]``), which cannot say "the token before a landmark predicts the token after it". Its
loss also accepts ``shift_labels``, the target of each position already aligned with ``logits``
(``logits[t]`` against ``shift_labels[t]``); when given, the shift is skipped, and the Trainer counts
the scored tokens from it (``num_items_in_batch``). :class:`LandmarkCollator` therefore returns
``shift_labels`` built as in docs/method.md (block_size 4, ``L`` landmark, ``-`` ignored)::

    raw tokens     a b c d e f g h
    input_ids      a b c L d e f L        (landmark iff p % block_size == block_size - 1)
    shift_labels   b c d - e f g -        (the target of each position; landmarks are not scored)
    labels         a b c - d e f -        (the conventional unshifted labels, kept for tools that
                                           read them; the loss uses shift_labels)

``model(**batch).loss`` (and so the Trainer) computes the mean cross-entropy over exactly the
positions whose ``shift_labels`` is not -100; :func:`landmark_loss` is the same formula, for loops
that compute the loss themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from landmark.data.landmarks import landmark_example
from landmark.hf.convert import LANDMARK_TOKEN

IGNORE_INDEX = -100  # the target of positions that are not scored (transformers' default)


def regular_tokens_per_window(max_length: int, block_size: int) -> int:
    """How many regular tokens fit in ``max_length`` positions once landmarks are inserted.

    When ``max_length % block_size == block_size - 1`` the landmark that would follow them lies just
    past the window; the collator drops it.
    """
    return max_length - max_length // block_size


class LandmarkCollator:
    """Collate raw token sequences into right-padded landmark batches for a converted model.

    Args:
        tokenizer: the converted tokenizer (must hold ``<landmark>``); its ``pad_token_id`` (else
            ``eos_token_id``, else 0) fills the padding.
        block_size: positions per block, landmark included (the model's ``config.landmark_block_size``).
        max_length: positions per example, landmarks included. An example of raw tokens
            ``r_0 .. r_n`` keeps at most ``max_length - max_length // block_size`` regular input tokens
            plus one more raw token, which is only a target.

    Call with a list of examples, each a mapping with ``"input_ids"`` (or a plain sequence): raw token
    ids without landmarks, at least 2 (the last one is only a target). Returns a dict of (batch, T)
    tensors, T the longest example after insertion (<= max_length): ``input_ids`` (int64),
    ``attention_mask`` (int64, 1 on real positions, right-padded), ``shift_labels`` and ``labels``
    (int64, -100 where not scored).
    """

    def __init__(self, tokenizer: Any, block_size: int, max_length: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an int >= 2; got {block_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < block_size:
            raise ValueError(
                f"max_length must be an int of at least one block ({block_size} positions: a window "
                f"without a landmark teaches nothing); got {max_length!r}"
            )
        landmark_id = tokenizer.get_vocab().get(LANDMARK_TOKEN)
        if landmark_id is None:
            raise ValueError(
                f"the tokenizer has no {LANDMARK_TOKEN} token: convert the model and tokenizer with "
                "landmark.hf.convert first"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.block_size = block_size
        self.max_length = max_length
        self.landmark_id = int(landmark_id)
        self.pad_id = int(pad) if pad is not None else 0
        self.max_raw_tokens = regular_tokens_per_window(max_length, block_size) + 1

    def example(self, raw: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """``(input_ids, shift_labels)`` of one example, both (T,) int64 with T <= max_length."""
        raw = torch.as_tensor(raw, dtype=torch.long).flatten()[: self.max_raw_tokens]
        if raw.numel() < 2:
            raise ValueError(
                f"an example needs at least 2 tokens (the last is only a target); got {raw.numel()}"
            )
        if bool((raw == self.landmark_id).any()):
            raise ValueError(
                f"an example already holds the landmark token (id {self.landmark_id}): pass raw tokens; the "
                "collator inserts the landmarks (tokenize text with split_special_tokens=True)"
            )
        input_ids, targets = landmark_example(raw, self.block_size, self.landmark_id, IGNORE_INDEX)
        return input_ids[: self.max_length], targets[: self.max_length]

    def __call__(self, features: Sequence[Mapping[str, Any] | Sequence[int] | Tensor]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        pairs = [self.example(f["input_ids"] if isinstance(f, Mapping) else f) for f in features]
        T = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), T), self.pad_id, dtype=torch.long)  # (B, T)
        shift_labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)  # (B, T)
        for row, (ids, targets) in enumerate(pairs):
            input_ids[row, : len(ids)] = ids
            shift_labels[row, : len(ids)] = targets
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill((input_ids == self.landmark_id) | (attention_mask == 0), IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "shift_labels": shift_labels,
        }


def landmark_loss(logits: Tensor, shift_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of ``logits`` (batch, T, vocab) against ``shift_labels`` (batch, T), no shift.

    The same value as ``model(**batch).loss`` for a batch of :class:`LandmarkCollator`.
    """
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device), ignore_index=ignore_index
    )
