"""What a retrieval step is about: the ``Step`` (shared by every layer of the step) and one layer's
``LayerInputs``; the pieces of ``landmark.inference.retrieval`` and the fused kernel take these two
objects instead of their fields one by one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from landmark.inference.memory import BlockMemory


@dataclass(frozen=True)
class Step:
    """One step of retrieval attention as every layer sees it: built once per call (or per plan) and
    passed to the planning, selection and attention pieces instead of their arguments one by one.

    Every layer of a step reads the same stream lengths, tail lengths and memory counts with the same
    configuration; only the queries, keys and values differ (``LayerInputs``).
    """

    local_len: Tensor  # (B,) real local context positions per row: tail + new positions
    q_start: Tensor  # (B,) local position of each row's first query (= its tail length)
    q_len: Tensor  # (B,) real query rows per batch row (the rest is padding)
    rows: int  # C: query rows of the step (or of one row group of a chunk)
    local_width: int  # T: length of the local context tensors (>= max(local_len))
    retrieval: Any  # the RetrievalConfig (landmark.inference.retrieval, which imports this module)
    block_size: int
    head_dim: int
    rope_base: float

    @classmethod
    def of(
        cls,
        inputs: LayerInputs,
        lengths: tuple[Tensor, Tensor, Tensor],
        retrieval: Any,
        block_size: int,
        rope_base: float,
    ) -> Step:
        """The step of ``inputs`` with ``lengths`` = (local_len, q_start, q_len), each (B,)."""
        local_len, q_start, q_len = lengths
        rows, head_dim = inputs.q.shape[2], inputs.q.shape[3]
        width = inputs.local_k.shape[2]
        return cls(local_len, q_start, q_len, rows, width, retrieval, block_size, head_dim, rope_base)

    def row_group(self, r0: int, r1: int) -> Step | None:
        """Query rows r0..r1-1 as a step of their own (they see the whole local context up to their own
        positions), or None when no batch row has a real query there."""
        group_len = (self.q_len - r0).clamp(0, r1 - r0)
        if not bool((group_len > 0).any()):
            return None
        return replace(self, q_start=self.q_start + r0, q_len=group_len, rows=r1 - r0)


@dataclass(frozen=True)
class LayerInputs:
    """One layer's tensors for a step (shapes as in ``retrieval_attention``)."""

    q: Tensor  # (B, H, C, D) un-rotated queries of the new positions
    local_k: Tensor  # (B, Hkv, T, D) un-rotated keys of the local context
    local_v: Tensor  # (B, Hkv, T, D)
    memory: BlockMemory | None  # the layer's block memory (None or empty: local attention only)
    scale: float

    def rows(self, r0: int, r1: int) -> LayerInputs:
        """The same inputs for query rows r0..r1-1 (the local context stays whole)."""
        return replace(self, q=self.q[:, :, r0:r1])


class Selection(NamedTuple):
    """Which blocks each (batch row, head, query row) attends to, in logical order (the fixed graph's
    selection, as the Triton attention kernel reads it)."""

    blocks: Tensor  # (B, H, C, K) logical block indices, ascending (any value where not valid)
    valid: Tensor  # (B, 1, C, K) bool: a real selection (rank < blocks held, on a real query row)
    recent_from: Tensor  # (B, 1, 1, 1) first logical index among the most recent blocks (one slot right)
    start: Tensor | None  # (B, 1, 1) ring-buffer starts (None: no row has wrapped)
