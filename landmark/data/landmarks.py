"""Landmark tokens in a token stream, and the training targets around them.

A block is ``block_size`` positions: ``block_size - 1`` regular tokens, then one landmark. For a
sequence that starts on a block boundary, position ``p`` is a landmark iff
``p % block_size == block_size - 1`` (docs/method.md). Landmarks are not targets; the regular
token just before a landmark predicts the regular token just after it. With ``block_size = 4``
(``L`` = landmark, ``-`` = ``ignore_index``)::

    raw tokens  a b c d e f g h
    input_ids   a b c L d e f L
    targets     b c d - e f g -
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (regular tokens + 1 landmark); got {block_size!r}")


def holds_integer_ids(t: Tensor) -> bool:
    """Whether a tensor's dtype can hold token ids: an integer type (not floating, complex or bool)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def insert_landmarks(tokens: Tensor, block_size: int, landmark_id: int) -> Tensor:
    """Insert ``landmark_id`` after every ``block_size - 1`` tokens along the last dimension.

    Args:
        tokens: (..., n) regular tokens, the first one starting a block.
        block_size: positions per block, landmark included.
        landmark_id: the value to insert (use ``ignore_index`` to build targets).

    Returns:
        (..., n + n // (block_size - 1)), same dtype: position ``p`` holds a landmark iff
        ``p % block_size == block_size - 1``. A complete final block gets its landmark; a partial one
        does not.
    """
    _check_block_size(block_size)
    if not isinstance(tokens, Tensor) or tokens.dim() == 0:
        raise TypeError(f"tokens must be a (..., n) tensor of token ids; got {type(tokens).__name__}")
    if not holds_integer_ids(tokens):
        raise TypeError(f"tokens must hold integer token ids; got {tokens.dtype}")
    r = block_size - 1
    n = tokens.shape[-1]
    full = (n // r) * r
    blocks = tokens[..., :full].reshape(*tokens.shape[:-1], n // r, r)  # (..., blocks, r)
    marks = blocks.new_full((*blocks.shape[:-1], 1), landmark_id)  # (..., blocks, 1)
    with_marks = torch.cat([blocks, marks], dim=-1).flatten(-2)  # (..., blocks * block_size)
    return torch.cat([with_marks, tokens[..., full:]], dim=-1)


def landmark_mask(length: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """(length,) bool: True at landmark positions ``p % block_size == block_size - 1``."""
    _check_block_size(block_size)
    return torch.arange(length, device=device) % block_size == block_size - 1


def landmark_targets(input_ids: Tensor, block_size: int, ignore_index: int = -100) -> Tensor:
    """Next-regular-token targets for a sequence that already holds landmarks.

    Args:
        input_ids: (..., T) tokens with landmarks at ``p % block_size == block_size - 1``.
        block_size: positions per block, landmark included.
        ignore_index: the target of landmark positions (and of the last regular position, whose next
            token is not in ``input_ids``; use :func:`landmark_example` to keep it).

    Returns:
        (..., T) int64: at a regular position, the next regular token; ``ignore_index`` elsewhere.
    """
    T = input_ids.shape[-1]
    regular = input_ids[..., ~landmark_mask(T, block_size, input_ids.device)].long()  # (..., n)
    pad = regular.new_full((*regular.shape[:-1], 1), ignore_index)
    shifted = torch.cat([regular[..., 1:], pad], dim=-1)  # (..., n)
    return insert_landmarks(shifted, block_size, ignore_index)[..., :T]


def landmark_example(
    raw: Tensor, block_size: int, landmark_id: int, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Model inputs and targets from raw tokens: insert landmarks, shift targets to the next regular token.

    Args:
        raw: (..., n + 1) regular tokens; the first starts a block, the last is only a target.
        block_size: positions per block, landmark included.
        landmark_id: the landmark token id.
        ignore_index: the target of landmark positions.

    Returns:
        ``(input_ids, targets)``, both (..., n + n // (block_size - 1)) int64. With
        ``n = (seq_len // block_size) * (block_size - 1)`` and ``block_size`` dividing ``seq_len``
        they are (..., seq_len) and end with a landmark.
    """
    raw = raw.long()
    input_ids = insert_landmarks(raw[..., :-1], block_size, landmark_id)
    targets = insert_landmarks(raw[..., 1:], block_size, ignore_index)
    return input_ids, targets
