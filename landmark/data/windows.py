"""Training and evaluation windows drawn from a token array (a prepared split's memory map).

With ``landmarks=True`` a window holds ``seq_len`` positions of the landmark-inserted stream:
``seq_len // block_size`` complete blocks, i.e. ``n = seq_len // block_size * (block_size - 1)``
regular tokens. Windows start on block boundaries of that stream, i.e. at raw-token offsets that
are multiples of ``block_size - 1``, so every window sees the same block layout as the whole stream
(landmarks at ``p % block_size == block_size - 1``). Each window also reads the raw token after its
last regular token, as the last target.

With ``landmarks=False`` a window is ``seq_len`` raw tokens at any offset, with next-token targets
(the full-attention and Transformer-XL baselines).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from landmark.config import DEFAULT_BLOCK_SIZE
from landmark.data.landmarks import landmark_example


@dataclass(frozen=True)
class Batch:
    """A batch of windows."""

    input_ids: Tensor  # (B, seq_len) int64
    targets: Tensor  # (B, seq_len) int64; ignore_index at landmark positions

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device``."""
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
        )


@dataclass(frozen=True)
class WindowLayout:
    """How a window of ``seq_len`` positions maps onto raw tokens; checks the settings once."""

    seq_len: int
    block_size: int = DEFAULT_BLOCK_SIZE
    landmarks: bool = True
    landmark_id: int | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive; got {self.seq_len}")
        if self.landmarks:
            if self.block_size < 2 or self.seq_len % self.block_size:
                raise ValueError(
                    f"block_size ({self.block_size}) must divide seq_len ({self.seq_len}) so that every "
                    "window holds whole blocks: choose seq_len as a multiple of block_size"
                )
            if self.landmark_id is None:
                raise ValueError("landmarks=True needs landmark_id (the tokenizer's landmark_id)")

    @property
    def regular_tokens(self) -> int:
        """Raw tokens a window feeds to the model (its reads are one more: the last target)."""
        if not self.landmarks:
            return self.seq_len
        return self.seq_len // self.block_size * (self.block_size - 1)

    @property
    def stride(self) -> int:
        """Window starts must be multiples of this raw offset (the regular tokens of a block)."""
        return self.block_size - 1 if self.landmarks else 1

    def batch(self, tokens: np.ndarray, starts: np.ndarray) -> Batch:
        """Windows at raw offsets ``starts`` (B,) of ``tokens`` (N,): input_ids, targets (B, seq_len)."""
        n = self.regular_tokens
        raw = torch.from_numpy(
            np.asarray(tokens[starts[:, None] + np.arange(n + 1)], dtype=np.int64)
        )  # (B, n+1)
        if not self.landmarks:
            return Batch(raw[:, :-1].contiguous(), raw[:, 1:].contiguous())
        return Batch(*landmark_example(raw, self.block_size, self.landmark_id, self.ignore_index))

    def check_length(self, num_tokens: int) -> None:
        """Raise a ValueError when ``num_tokens`` cannot hold one window."""
        if num_tokens < self.regular_tokens + 1:
            raise ValueError(
                f"the token array holds {num_tokens} tokens, fewer than one window needs "
                f"({self.regular_tokens + 1}): use a shorter seq_len or a bigger split"
            )


class WindowSampler:
    """Random training windows, reproducible and resumable: ``batch(step)`` depends only on
    (seed, rank, step), so a run restarted at step s draws the same batches as an unbroken one.

    Args:
        tokens: (N,) token ids (e.g. ``TokenSplit.tokens``, a uint16/uint32 memory map).
        seq_len: positions per window (landmarks included when ``landmarks``).
        batch_size: windows per batch.
        landmark_id: the tokenizer's landmark id; required when ``landmarks``.
        block_size: positions per block, landmark included; must divide ``seq_len``.
        landmarks: insert landmarks (True) or return plain windows (False).
        seed: the run's seed (>= 0).
        rank: the data-parallel rank; ranks draw independent batches.

    Landmark positions get the target ``WindowLayout.ignore_index`` (-100, the model's ``IGNORE_INDEX``).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        landmark_id: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        landmarks: bool = True,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.layout = WindowLayout(seq_len, block_size, landmarks, landmark_id)
        self.layout.check_length(len(tokens))
        if batch_size < 1 or seed < 0 or rank < 0:
            raise ValueError(f"batch_size must be >= 1, seed and rank >= 0; got {batch_size}, {seed}, {rank}")
        self.tokens, self.batch_size, self.seed, self.rank = tokens, batch_size, seed, rank

    def starts(self, step: int) -> np.ndarray:
        """(batch_size,) int64 raw offsets of the windows of batch ``step``."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        stride = self.layout.stride
        last = (len(self.tokens) - self.layout.regular_tokens - 1) // stride  # the last valid start / stride
        return rng.integers(0, last + 1, size=self.batch_size, dtype=np.int64) * stride

    def batch(self, step: int) -> Batch:
        """Batch ``step``: input_ids and targets, (batch_size, seq_len) int64."""
        return self.layout.batch(self.tokens, self.starts(step))

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        """Batches ``step``, ``step + 1``, ... without end."""
        while True:
            yield self.batch(step)
            step += 1


class SequentialWindows:
    """Non-overlapping windows covering a split in order, for evaluation.

    Window ``i`` feeds raw tokens ``[i * n, (i + 1) * n)`` (``n`` = ``WindowLayout.regular_tokens``)
    and predicts up to raw token ``(i + 1) * n``; the final partial window is dropped. Takes the same
    arguments as :class:`WindowSampler` (without seed and rank); iterating yields batches of
    ``batch_size`` windows (the last batch may be smaller).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int = 1,
        *,
        landmark_id: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        landmarks: bool = True,
    ) -> None:
        self.layout = WindowLayout(seq_len, block_size, landmarks, landmark_id)
        self.layout.check_length(len(tokens))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.tokens, self.batch_size = tokens, batch_size
        self.num_windows = (len(tokens) - 1) // self.layout.regular_tokens

    def __len__(self) -> int:
        """The number of batches."""
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = self.layout.regular_tokens
        for first in range(0, self.num_windows, self.batch_size):
            windows = np.arange(first, min(first + self.batch_size, self.num_windows), dtype=np.int64)
            yield self.layout.batch(self.tokens, windows * n)
