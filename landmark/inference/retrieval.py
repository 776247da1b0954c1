"""Top-k block retrieval through the landmarks, and attention over retrieved blocks + local context.

For a step that adds ``c_b`` new positions to each batch row ``b`` (a chunk during prefill, one or two
positions while decoding), every layer:

1. scores the new queries against the landmark keys of all blocks in its memory;
2. selects the top-k blocks (``k_eff = min(k, blocks in memory)``, per row) at one of three
   granularities (docs/method.md, paper Table 2):

   * ``"token_head"`` (default): every query row of every head picks its own k blocks;
   * ``"token"``: per query row, shared across heads (the heads' landmark probabilities averaged);
   * ``"head"``: per head, shared across the step's query rows (probabilities averaged over rows);
     the cheapest to fetch from slow memory;

3. attends, with ONE grouped softmax, to: the selected memory blocks (their landmark scores join the
   group and gate their blocks), the local context (the incomplete tail block plus the new positions,
   with the training-time layout: own block directly, earlier local blocks through their landmarks).

Positions (the paper's "stingy" mapping, RoPE does not extrapolate): the local context starts at
position ``(k_eff + 1) * block_size``. For scoring, the landmarks of the ``k_eff`` most recent memory
blocks sit at slots ``1..k_eff`` (the most recent at ``k_eff``) and all older landmarks at slot 0
(slot ``j`` = positions ``j * bs .. j * bs + bs - 1``). For attention, the ``s``-th selected block of a
query (chronological order) sits at slot ``s``, shifted one slot right if it is among the ``k_eff``
most recent. When memory holds at most k blocks every block is selected and lands exactly where it
would be in one full pass (up to a constant shift, which RoPE ignores).

Fetching the selected blocks: every (query row, head) reads exactly its own k blocks of its own kv
head, gathered by block index (no union of blocks, no per-slot loop), and the landmark scan rotates
the query instead of the N landmark keys (slot 0 for the old blocks, one rotation per recent slot),
so a step reads the N landmark keys once, k blocks per query row and head, and the local context,
with a fixed number of tensor operations.

Landmark search (``RetrievalConfig.search``): ``"exact"`` (default) scores every landmark in memory;
``"faiss"`` asks an inner-product index over the landmark keys for candidates (see
``landmark.inference.search``) and scores only those exactly.

How a call is organised:

* ``retrieval_attention`` (what the models call) describes the step once: a ``Step`` (row lengths
  and positions, block size, head dim, RoPE base, the ``RetrievalConfig``: what every layer of the
  step shares) and the layer's ``LayerInputs`` (queries, local keys and values, memory, scale); the
  pieces below take these two objects and a plan.
* ``plan_step`` builds what the layers of a step share:
  a ``kernel.KernelPlan`` where the fused C++ kernel applies, a ``DecodePlan`` for an eager decode
  step (at most ``DECODE_ROWS`` query rows), else nothing (an eager prefill chunk plans each group of
  ``RetrievalConfig.row_group`` query rows). A ``DecodePlan`` has one part per concern: ``BlockPlan``
  (what the rows select from: blocks per row, where the recent blocks sit), ``RowPlan`` (where the
  query rows and local keys are: positions and their RoPE angles) and ``GroupPlan`` (which keys join
  each query's softmax group).
* The reference, ``reference_attention`` (the eager path): the step in PyTorch tensor operations, on
  any device and dtype. A chunk runs in groups of ``row_group`` query rows, so the gathered blocks
  take O(row_group x heads x k x block x head_dim) memory whatever the chunk length; a decode step is
  one group. It is the specification: tests check decoding against chunked prefill and chunked
  prefill against one full pass, and the optimised path against it (as ``landmark.ops.reference``
  is for the training-time operators).
* The optimised path, the fused C++ kernel (``landmark.inference.kernel``; CPU float32): one call per
  layer and step. It selects itself (token_head, exact search) or is given the reference's selection
  (``reference_selection``: the other granularities and FAISS), and attends with the blocks read where
  they are stored. tests/test_kernel.py checks it against ``reference_attention``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from landmark.files import path_problem
from landmark.inference import kernel
from landmark.inference.memory import BlockMemory
from landmark.inference.search import DEFAULT_APPROX_MIN_BLOCKS, search_candidates
from landmark.inference.step import LayerInputs, Step
from landmark.inference.superblocks import bounded_candidates, top_k_candidates
from landmark.model import apply_rope, rope_angles
from landmark.ops.reference import grouped_softmax

GRANULARITIES = ("token_head", "token", "head")
MAX_K = 2**31 - 1  # blocks retrieved per query at most (2**31 blocks of 64: 1.4e11 positions; int32-safe)
BLOCK_DTYPES = {"model": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.int8}  # fmt: skip
SEARCHES = ("exact", "faiss", "bounded")
DECODE_ROWS = 2  # steps with at most this many query rows take the decode path (a token + its landmark)


@dataclass
class RetrievalConfig:
    k: int = 4  # blocks retrieved per selection unit
    granularity: str = "token_head"  # "token_head" | "token" | "head"
    row_group: int = 64  # query rows whose retrieved blocks are gathered together (bounds memory)
    # landmark search: "exact" scan of every landmark | "faiss" index (optional extra) | "bounded":
    # super-block bounds visited best first (inference.superblocks), the exact scan's selection (token_head)
    search: str = "exact"
    candidates: int = 0  # faiss: old-block candidates per query row and head (0: 2 * k + 8)
    # faiss: blocks per stream from which the index is approximate (HNSW) instead of exact (flat)
    approx_min_blocks: int = DEFAULT_APPROX_MIN_BLOCKS
    compile: bool = False  # decode steps through torch.compile'd stages (measured slower on CPU)
    # "auto": the fused C++ kernel for CPU float32 steps, the fixed graph (landmark.inference.graph) on
    # other devices, else the reference | "cpp" | "graph" | "torch" (the reference) | "triton": the
    # fixed graph attending through one Triton kernel (landmark.inference.triton_retrieval; a GPU, or
    # the CPU through the Triton interpreter)
    kernel: str = "auto"
    # how the block memory stores block contents: "model" (the keys' dtype) | "float32" | "float16" |
    # "bfloat16" | "int8" (a float32 scale per block, kv head and keys|values); landmark keys stay as
    # the model makes them (the selection reads them)
    block_dtype: str = "model"
    # a folder for the block contents as memory-mapped files (None: in memory): inputs larger than RAM
    block_folder: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise ValueError(
                f"k (blocks retrieved per query) must be an integer in [1, {MAX_K}]; got {self.k!r}"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if self.row_group < 1:
            raise ValueError(f"row_group must be >= 1; got {self.row_group}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}; got {self.search!r}")
        if self.search == "bounded" and self.granularity != "token_head":
            raise ValueError(
                f'search="bounded" selects per query row and head: granularity must be "token_head"; '
                f"got {self.granularity!r}"
            )
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 0:
            raise ValueError(f"candidates must be an integer >= 0 (0: 2 * k + 8); got {self.candidates!r}")
        if isinstance(self.approx_min_blocks, bool) or not isinstance(self.approx_min_blocks, int):
            raise ValueError(f"approx_min_blocks must be an integer; got {self.approx_min_blocks!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False; got {self.compile!r}")
        if self.kernel not in kernel.KERNELS:
            raise ValueError(f"kernel must be one of {kernel.KERNELS}; got {self.kernel!r}")
        if self.block_dtype not in BLOCK_DTYPES:
            raise ValueError(f"block_dtype must be one of {tuple(BLOCK_DTYPES)}; got {self.block_dtype!r}")
        if self.block_folder is not None and not isinstance(self.block_folder, str | os.PathLike):
            raise ValueError(f"block_folder must be a folder path or None; got {self.block_folder!r}")
        problem = None if self.block_folder is None else path_problem(Path(self.block_folder), folder=True)
        if problem not in (None, "does not exist"):  # a missing folder is made
            raise ValueError(f"block_folder {self.block_folder} {problem}")
        if self.kernel == "cpp" and self.compile:
            raise ValueError(
                'compile=True runs torch.compile\'d stages in place of the C++ kernel: kernel="cpp" and '
                "compile exclude each other"
            )
        if self.kernel in ("graph", "triton") and self.search != "exact":
            raise ValueError(
                f'kernel="{self.kernel}" scans every landmark: search must be "exact"; got {self.search!r}'
            )
        if self.kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise ValueError('kernel="triton" needs triton: pip install "landmark-attention[gpu]"')

    def kernel_for(self, dtype: torch.dtype, device: torch.device, memory: BlockMemory | None):
        """The compiled C++ kernel if a step with queries of ``dtype`` on ``device`` over ``memory``
        takes it, else None (see ``landmark.inference.kernel``)."""
        if self.kernel in ("torch", "graph", "triton"):
            return None
        if not kernel.kernel_applies(dtype, device, memory, self.compile):
            return None
        return kernel.kernel_module(required=self.kernel == "cpp")

    def takes_graph(self, dtype: torch.dtype, device: torch.device, memory: BlockMemory | None) -> bool:
        """Whether a step with queries of ``dtype`` on ``device`` takes the fixed graph of tensor
        operations (``landmark.inference.graph``): asked for, or ``"auto"`` off the CPU (exact search)."""
        if self.kernel in ("graph", "triton"):
            return True
        return self.kernel == "auto" and self.search == "exact" and torch.device(device).type != "cpu"

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """The block memory's storage dtype (None: the model's)."""
        return BLOCK_DTYPES[self.block_dtype]

    @property
    def kernel_selects(self) -> bool:
        """Whether the fused kernel also selects the blocks (token_head, exact search)."""
        return self.granularity == "token_head" and self.search == "exact"

    @property
    def n_candidates(self) -> int:
        """Old-block candidates that the index returns per query row and head."""
        return self.candidates or 2 * self.k + 8


@dataclass
class StepStats:
    """What the layer steps read (for benchmarks), summed over steps and layers.

    ``landmarks_scored``: landmark keys scored (per batch row; each one all kv heads' keys).
    ``block_heads_fetched``: (block, kv head) pairs whose keys and values were read: the unit of the
    bytes read from memory (every query row and head reads its own selections).
    ``local_positions``: positions of local context (tail + new) attended to (per batch row).
    ``selections``: None, or a list to which every layer call that retrieves appends the blocks its
    query rows selected: (B, H, C, k) logical block indices, -1 where a row selected fewer (a trace for
    inspection: ``benchmarks/retrieval_trace.py``; set it to ``[]`` before the steps to trace).
    """

    landmarks_scored: int = 0
    block_heads_fetched: int = 0
    local_positions: int = 0
    selections: list[Tensor] | None = None

    def record(self, selected: Tensor, valid: Tensor | None = None) -> None:
        """Append (B, H, C, k) selected blocks to ``selections`` when tracing (invalid entries -> -1)."""
        if self.selections is not None:
            marked = selected if valid is None else torch.where(valid, selected, -1)
            self.selections.append(marked.detach().cpu())


# --- The entry point ----------------------------------------------------------------------------------------


def retrieval_attention(
    inputs: LayerInputs,
    step: Step,
    stats: StepStats | None = None,
    plan: DecodePlan | kernel.KernelPlan | None = None,
) -> Tensor:
    """Landmark attention of new queries over retrieved memory blocks and the local context.

    Args:
        inputs: the layer's tensors: q (B, H, C, D) un-rotated queries of the new positions (row b has
            q_len[b] real ones); local_k, local_v (B, Hkv, T, D) un-rotated keys/values of the local
            context (the incomplete tail block followed by the new positions; row b has local_len[b]
            real positions; local position 0 is a block boundary); the layer's block memory (None or
            empty: local attention only); the score scale.
        step: what every layer of the step shares (``Step.of``): local_len, q_start (each row's tail
            length), q_len, the ``RetrievalConfig``, block size, RoPE base.
        plan: what the layers of one step share (``plan_step``): a ``kernel.KernelPlan`` for a step
            that takes the fused C++ kernel (``retrieval.kernel_for``), a ``DecodePlan`` for an eager
            decode step (at most ``DECODE_ROWS`` rows); None: chosen and built here.

    Returns:
        (B, H, C, D) attention outputs; padding rows are zero.
    """
    memory = inputs.memory
    if memory is not None and memory.rope_base != step.rope_base:
        raise ValueError(
            f"the memory stores keys rotated with rope_base {memory.rope_base}; attention uses "
            f"{step.rope_base}"
        )
    if plan is None and bool((step.q_len > 0).any()):
        plan = plan_step(step, memory, inputs.q.dtype)
    if isinstance(plan, kernel.KernelPlan):
        return _kernel_attention(inputs, step, plan, stats)
    return reference_attention(inputs, step, plan, stats)


def plan_step(
    step: Step, memory: BlockMemory | None, dtype: torch.dtype
) -> DecodePlan | kernel.KernelPlan | None:
    """What the layers of one step share: the fused kernel's plan where the kernel applies
    (``RetrievalConfig.kernel_for`` for queries of ``dtype``), else a ``DecodePlan`` for a decode step
    (at most ``DECODE_ROWS`` query rows), else None (the reference plans a chunk per row group)."""
    retrieval = step.retrieval
    module = retrieval.kernel_for(dtype, step.q_start.device, memory)
    if module is not None:
        held = max(memory.count, default=0) if memory is not None else 0
        k = min(retrieval.k, max(1, held))  # no more blocks than the memory holds (a huge --k costs nothing)
        return kernel.kernel_plan(module, step, k, retrieval.kernel_selects)
    if step.rows > DECODE_ROWS:
        return None
    return decode_plan(step, _block_counts(memory, step.q_start))


def _block_counts(memory: BlockMemory | None, q_start: Tensor) -> Tensor:
    """(B,) blocks held per row (zeros without a memory), on ``q_start``'s device."""
    count = memory.count if memory is not None else [0] * q_start.shape[0]
    return torch.tensor(count, device=q_start.device)


# --- The plan of an eager group of query rows (a decode step is one group) ----------------------------------


@dataclass
class BlockPlan:
    """What the query rows select from: the blocks in memory and where the most recent ones sit."""

    n_blocks: Tensor  # (B,) blocks in memory per row
    k_eff: Tensor  # (B,) min(k, n_blocks)
    n_max: int  # max(n_blocks)
    k_max: int  # max(k_eff)
    blocks_total: int  # sum(n_blocks): the landmarks an exact scan scores
    uniform: bool  # every row holds n_max >= k blocks and every query row is real (no masking needed)
    recent: Tensor  # (B, k_max) logical index of the block at landmark slot s = 1..k_max (0 if none)
    recent_column: Tensor  # (B, k_max) score column to overwrite (n_max: a spare column)
    recent_from: Tensor  # (B, 1, 1, 1) first logical index among the k_eff most recent blocks


class Rotations(NamedTuple):
    """The RoPE angles of a group's queries and local keys (what ``_decode_local`` rotates by)."""

    cos_q: Tensor  # (B, 1, C, J, D/2) query angles: attention slots j = 0..k_max, then landmark slots
    sin_q: Tensor
    cos_local: Tensor  # (B, 1, T', D/2) local key angles (T' = local context padded to whole blocks)
    sin_local: Tensor
    slots: int  # k_max + 1 attention slots (the landmark slots follow them in cos_q, sin_q)
    block_size: int


@dataclass
class RowPlan:
    """Where the query rows and the local keys are: their positions and rotations."""

    row_valid: Tensor  # (B, C) real query rows
    q_local: Tensor  # (B, C) local position of each query row
    q_pos: Tensor  # (B, C) query positions
    key_local: Tensor  # (T',) local positions of the local keys, padded to whole blocks
    rotations: Rotations
    local_positions: int  # local context positions attended to, summed over rows


@dataclass
class GroupPlan:
    """Which keys join each query's softmax group (``grouped_softmax``'s ``current`` and ``earlier``)."""

    local_current: Tensor  # (B, 1, C, nb, bs) own-block local keys each query sees
    local_earlier: Tensor  # (B, 1, C, nb) complete local blocks reached through their landmark
    current: Tensor  # (B, 1, C, k_max + nb, bs) with the memory blocks, when every selection is real
    earlier: Tensor  # (B, 1, C, k_max + nb) blocks reached through their landmark, ditto


@dataclass
class DecodePlan:
    """What a group of query rows computes once for all layers: a decode step's (at most
    ``DECODE_ROWS`` query rows), built by ``plan_step`` and passed to every layer, or one row group's
    of an eager chunk.

    Every layer of a step sees the same stream lengths, tail lengths and memory counts, so positions,
    rotation angles, masks and the recent blocks' indices are shared; only q, k, v and the selection
    differ per layer. The plan's ``step`` (configuration, block size, RoPE base) is the one used.
    """

    step: Step
    blocks: BlockPlan
    rows: RowPlan
    groups: GroupPlan


def decode_plan(step: Step, n_blocks: Tensor) -> DecodePlan:
    """The layer-independent part of a group of query rows (``step.rows`` of them) over a memory that
    holds ``n_blocks`` (B,) blocks per row."""
    blocks = _block_plan(step, n_blocks)
    rows = _row_plan(step, blocks)
    return DecodePlan(step, blocks, rows, _group_plan(step, blocks, rows))


def _block_plan(step: Step, n_blocks: Tensor) -> BlockPlan:
    """How many blocks each row selects from, and the recent blocks' slots and score columns."""
    k = step.retrieval.k
    n_max = int(n_blocks.max())
    k_max = min(k, n_max)
    k_eff = torch.clamp(n_blocks, max=k)
    s = torch.arange(1, k_max + 1, device=n_blocks.device)  # the landmark slots of the recent blocks
    recent = n_blocks[:, None] - 1 - k_eff[:, None] + s  # (B, k_max)
    ok = s <= k_eff[:, None]
    uniform = bool((n_blocks == n_max).all() and (step.q_len == step.rows).all()) and n_max >= k
    return BlockPlan(
        n_blocks=n_blocks,
        k_eff=k_eff,
        n_max=n_max,
        k_max=k_max,
        blocks_total=int(n_blocks.sum()),
        uniform=uniform,
        recent=torch.where(ok, recent, 0),
        recent_column=torch.where(ok, recent, n_max),
        recent_from=(n_blocks - k_eff)[:, None, None, None],
    )


def _row_plan(step: Step, blocks: BlockPlan) -> RowPlan:
    """Positions of the query rows and local keys (the local context starts at (k_eff + 1) * bs), and
    the angles that place the queries at every slot they need."""
    bs, dev, k_max = step.block_size, blocks.n_blocks.device, blocks.k_max
    base = (blocks.k_eff + 1) * bs  # (B,) position of local position 0
    q_local = step.q_start[:, None] + torch.arange(step.rows, device=dev)  # (B, C)
    row_valid = torch.arange(step.rows, device=dev)[None, :] < step.q_len[:, None]
    q_pos = base[:, None] + q_local
    nb_local = -(-step.local_width // bs)
    cos_t, sin_t = kernel.rope_table(max(k_max, 1), step.local_width, bs, step.head_dim, step.rope_base, dev)
    j = torch.arange(k_max + 1, device=dev)
    pos = q_pos[:, :, None] - torch.cat((j * bs, j * bs + bs - 1))  # (B, C, J)
    key_local = torch.arange(nb_local * bs, device=dev)  # (T',)
    kpos = base[:, None] + key_local  # (B, T')
    rotations = Rotations(
        cos_q=cos_t[pos][:, None],
        sin_q=sin_t[pos][:, None],
        cos_local=cos_t[kpos][:, None],
        sin_local=sin_t[kpos][:, None],
        slots=k_max + 1,
        block_size=bs,
    )
    return RowPlan(row_valid, q_local, q_pos, key_local, rotations, int(step.local_len.sum()))


def _group_plan(step: Step, blocks: BlockPlan, rows: RowPlan) -> GroupPlan:
    """The training-time layout of the local context (own block directly, earlier local blocks through
    their landmarks), and the same with ``k_max`` memory blocks in front when all are selected."""
    bs, batch, c = step.block_size, blocks.n_blocks.shape[0], step.rows
    key_local, q_local, row_valid = rows.key_local, rows.q_local, rows.row_valid
    nb_local = key_local.shape[0] // bs
    key_real = key_local[None, :] < step.local_len[:, None]
    visible = key_real[:, None, :] & (key_local[None, None, :] <= q_local[:, :, None])  # (B, C, T')
    q_block = torch.div(q_local, bs, rounding_mode="floor")
    same_block = (key_local // bs)[None, None, :] == q_block[:, :, None]
    local_current = (visible & same_block & row_valid[:, :, None]).view(batch, 1, c, nb_local, bs)
    local_earlier = torch.arange(nb_local, device=key_local.device)[None, None, :] < q_block[:, :, None]
    local_earlier = (local_earlier & row_valid[:, :, None])[:, None]
    no_current = local_current.new_zeros(batch, 1, c, blocks.k_max, bs)
    all_earlier = local_earlier.new_ones(batch, 1, c, blocks.k_max)
    return GroupPlan(
        local_current=local_current,
        local_earlier=local_earlier,
        current=torch.cat((no_current, local_current), dim=3),
        earlier=torch.cat((all_earlier, local_earlier), dim=3),
    )


# --- The reference: the eager path --------------------------------------------------------------------------


def reference_attention(
    inputs: LayerInputs, step: Step, plan: DecodePlan | None = None, stats: StepStats | None = None
) -> Tensor:
    """``retrieval_attention`` in PyTorch tensor operations (the eager path): any device and dtype, the
    reference that the fused kernel is tested against.

    A decode step runs as one group of query rows, described by ``plan`` (``plan_step``); a chunk
    (``plan`` None) in groups of ``row_group`` query rows, each run like a decode step: the memory
    does not change within a step, and each group's rows see the whole local context up to their own
    positions. Returns (B, H, C, D); padding rows are zero.
    """
    if plan is not None:
        if stats is not None:
            stats.local_positions += plan.rows.local_positions
        return _attend_group(inputs, plan, stats)
    if stats is not None:
        stats.local_positions += int(step.local_len.sum())
    out = inputs.q.new_zeros(inputs.q.shape)
    for r0, r1, group in _row_groups(step, inputs.memory):
        out[:, :, r0:r1] = _attend_group(inputs.rows(r0, r1), group, stats)
    return out


def reference_selection(inputs: LayerInputs, step: Step) -> Tensor:
    """The reference's selection for a whole step, in groups of ``row_group`` query rows as it attends:
    (B, H, C, K) logical indices, valid first, ascending, -1 for none (``kernel.retrieval_step``'s
    ``selected``)."""
    batch, heads, rows, _ = inputs.q.shape
    width = min(step.retrieval.k, max(inputs.memory.count))
    out = torch.full((batch, heads, rows, width), -1, dtype=torch.long, device=inputs.q.device)
    if width == 0:
        return out
    for r0, r1, plan in _row_groups(step, inputs.memory):
        group = inputs.rows(r0, r1)
        _, q_lm, _, _ = _decode_local(group.q, group.local_k, group.local_v, plan.rows.rotations, group.scale)
        selected, valid, _ = _select(group, q_lm, plan)
        row_valid = plan.rows.row_valid[:, None, :, None]
        valid = row_valid if valid is None else valid & row_valid
        selected = torch.where(valid, selected, -1)
        out[:, :, r0:r1, : selected.shape[-1]] = selected
    return out


def _row_groups(step: Step, memory: BlockMemory | None) -> Iterator[tuple[int, int, DecodePlan]]:
    """The groups of ``row_group`` query rows a chunk is processed in: ``(r0, r1, plan)`` for rows
    r0..r1-1 while any row has real queries there."""
    n_blocks = _block_counts(memory, step.q_start)
    for r0 in range(0, step.rows, step.retrieval.row_group):
        r1 = min(step.rows, r0 + step.retrieval.row_group)
        group = step.row_group(r0, r1)
        if group is None:
            return
        yield r0, r1, decode_plan(group, n_blocks)


def _attend_group(inputs: LayerInputs, plan: DecodePlan, stats: StepStats | None) -> Tensor:
    """The reference for one group of query rows (a decode step, or ``row_group`` rows of a prefill
    chunk), described by ``plan``.

    A small, fixed number of tensor operations, in three stages (pure tensor functions; decode steps
    run them through ``torch.compile`` when ``retrieval.compile``):

    * ``_decode_local``: one rotation of the queries to every position they need: ``q_pos - j * bs``
      (attention to a block at slot j; j = 0 is the query's own position, for the local context) and
      ``q_pos - s * bs - (bs - 1)`` (the landmark of slot s, for scoring); the local context's scores;
    * selection (``_select``): the landmark scan reads the N un-rotated landmark keys once: old blocks
      (slot 0) with one matmul, the ``k_eff`` recent ones re-scored at their slots (``_decode_select``
      when every row holds the same number >= k of blocks and the granularity is per token and head);
    * ``_decode_attend``: every (query row, head) reads exactly its own k blocks of its kv head (no
      union, no slot loop), one grouped softmax with the local context.

    Shapes as in ``retrieval_attention``; returns (B, H, C, D).
    """
    q, memory = inputs.q, inputs.memory
    batch, kv_heads = q.shape[0], inputs.local_k.shape[1]
    compiled = plan.step.retrieval.compile and q.shape[2] <= DECODE_ROWS  # prefill stays eager
    stage = _compiled if compiled else _eager
    q_att, q_lm, local_scores, lv = stage("local")(
        q, inputs.local_k, inputs.local_v, plan.rows.rotations, inputs.scale
    )
    if memory is None or plan.blocks.n_max == 0:
        groups = plan.groups
        return _apply(grouped_softmax(local_scores, groups.local_current, groups.local_earlier), lv, kv_heads)

    selected, sel_valid, scored = _select(inputs, q_lm, plan, stage)
    current, earlier, sel_valid = _softmax_groups(plan, selected, sel_valid)
    if stats is not None:
        stats.landmarks_scored += scored
        stats.block_heads_fetched += selected.numel() if sel_valid is None else int(sel_valid.sum())
        stats.record(selected, sel_valid)

    # Each (row, head) attends to its own blocks: (B, Hkv, M = G * C * k) per kv head.
    blocks = memory.gather_per_head(selected.reshape(batch, kv_heads, -1))
    local = (local_scores, lv)
    return stage("attend")(q_att, selected, plan.blocks.recent_from, blocks, local, (current, earlier))


def _softmax_groups(
    plan: DecodePlan, selected: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``grouped_softmax``'s ``current`` and ``earlier`` over the selected blocks (``selected``: (B, H,
    C, k)) and the local context, and the selections that are real (None: all of them)."""
    if valid is None:  # every selection is real: the step's masks are shared by all layers
        return plan.groups.current, plan.groups.earlier, None
    batch, heads, rows, k_sel = selected.shape
    local_current, local_earlier = plan.groups.local_current, plan.groups.local_earlier
    valid = valid & plan.rows.row_valid[:, None, :, None]
    no_current = local_current.new_zeros(batch, 1, rows, k_sel, plan.step.block_size)
    current = torch.cat((no_current, local_current), dim=3)
    earlier = torch.cat((valid, local_earlier.expand(-1, heads, -1, -1)), dim=3)
    return current, earlier, valid


def _select(
    inputs: LayerInputs, q_lm: Tensor, plan: DecodePlan, stage=None
) -> tuple[Tensor, Tensor | None, int]:
    """The blocks a group of query rows retrieves (any granularity, exact or FAISS search).

    Args:
        q_lm: the group's queries rotated to the landmark slots (``_decode_local``).

    Returns:
        selected: (B, H, C, k) logical indices, ascending, valid first; valid: (B, H, C, k) or None when
        every selection is real; the number of landmarks scored.
    """
    memory, blocks, retrieval = inputs.memory, plan.blocks, plan.step.retrieval
    per_token_head = retrieval.granularity == "token_head"
    if retrieval.search == "faiss":
        return _search_select(inputs, plan)
    if retrieval.search == "bounded" and blocks.uniform and not any(memory.start):
        return _bounded_select(q_lm, memory.landmarks(), blocks.k_max)
    if blocks.uniform and not any(memory.start) and per_token_head:
        # same count per row, no ring-buffer wrap-around, nothing to mask: top-k, in order
        return (stage or _eager)("select")(q_lm, memory.landmarks(), blocks.k_max), None, blocks.blocks_total
    scores = _exact_scores(q_lm, memory, plan)
    if blocks.uniform and per_token_head:
        return top_k_blocks(scores, blocks.k_max), None, blocks.blocks_total
    selected, valid = select_blocks(
        scores, blocks.n_blocks, plan.rows.row_valid, retrieval.k, retrieval.granularity
    )
    return selected, valid, blocks.blocks_total


def _exact_scores(q_lm: Tensor, memory: BlockMemory, plan: DecodePlan) -> Tensor:
    """(B, H, C, N) scores of every landmark in memory: the old blocks' at slot 0, the ``k_eff`` most
    recent ones' re-scored at their own slots s = 1..k_eff."""
    batch, heads, rows = q_lm.shape[:3]
    kv_heads, n_max = memory.kv_heads, plan.blocks.n_max
    landmark_keys = memory.landmarks()  # (B, Hkv, N, D), un-rotated
    scores = _landmark_scores(_grouped(q_lm[:, :, :, 0], kv_heads), landmark_keys)
    lm_recent = memory.landmarks_at(plan.blocks.recent)  # (B, Hkv, k, D)
    rec = _landmark_scores_at_slots(_grouped(q_lm[:, :, :, 1:], kv_heads), lm_recent)  # (B,Hkv,G,C,k)
    column = plan.blocks.recent_column[:, None, None, None, :].expand(*rec.shape)
    scores = torch.cat((scores, scores[..., :1]), dim=-1).scatter(-1, column, rec)[..., :n_max]
    return scores.reshape(batch, heads, rows, n_max)


def _search_select(inputs: LayerInputs, plan: DecodePlan) -> tuple[Tensor, Tensor, int]:
    """Selection through the FAISS index: candidates from the index + the recent blocks, scored exactly.

    Returns:
        selected, valid: as ``select_blocks`` (logical indices); the number of landmarks scored.
    """
    q, memory, step = inputs.q, inputs.memory, plan.step
    if memory.index is None:
        raise ValueError('search="faiss" needs a BlockMemory with a LandmarkIndex (see InferenceSession)')
    batch, heads, rows, _ = q.shape
    kv_heads, bs, rope_base = memory.kv_heads, step.block_size, step.rope_base
    n_blocks, k_eff, q_pos = plan.blocks.n_blocks, plan.blocks.k_eff, plan.rows.q_pos
    n_old = n_blocks - k_eff
    q_old = _grouped(_rope(q, q_pos - (bs - 1), rope_base), kv_heads)  # (B, Hkv, G, C, D)
    found = search_candidates(memory.index, q_old, plan.rows.row_valid, n_old, step.retrieval.n_candidates)
    cand, n_cand = _candidate_table(found, n_old, n_blocks, q.device)
    # Exact scores of the candidates at their scoring slots (0 for old blocks, 1..k_eff for recent ones).
    lm = memory.landmarks_at(cand)  # (B, Hkv, M, D)
    age = n_blocks[:, None] - 1 - cand
    score_slot = torch.where(age < k_eff[:, None], k_eff[:, None] - age, torch.zeros_like(age))
    lm_rot = _rope(lm, score_slot * bs + bs - 1, rope_base)
    q_rot = _rope(q, q_pos, rope_base)
    scores = torch.einsum("bkgcd,bknd->bkgcn", _grouped(q_rot, kv_heads), lm_rot) * inputs.scale
    scores = scores.reshape(batch, heads, rows, cand.shape[1])
    # Candidates are in chronological order, so indices into them sort like logical indices.
    retrieval = step.retrieval
    picked, valid = select_blocks(scores, n_cand, plan.rows.row_valid, retrieval.k, retrieval.granularity)
    index = cand[:, None, None, :].expand(-1, heads, rows, -1).gather(-1, picked)
    return torch.where(valid, index, torch.zeros_like(index)), valid, int(n_cand.sum())


def _candidate_table(
    found: list[Tensor], n_old: Tensor, n_blocks: Tensor, dev: torch.device
) -> tuple[Tensor, Tensor]:
    """Candidate set per batch row: the index's hits among old blocks, then the k_eff recent blocks.

    Returns:
        cand: (B, M) logical indices in chronological order, padded with 0; n_cand: (B,) real ones.
    """
    cands = [
        torch.cat((f, torch.arange(int(n_old[b]), int(n_blocks[b]), device=dev))) for b, f in enumerate(found)
    ]
    cand = torch.zeros(len(cands), max(len(c) for c in cands), dtype=torch.long, device=dev)
    for b, c in enumerate(cands):
        cand[b, : len(c)] = c
    return cand, torch.tensor([len(c) for c in cands], device=dev)


def _decode_local(
    q: Tensor, local_k: Tensor, local_v: Tensor, rotations: Rotations, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rotated queries and the local context's scores of a group of query rows.

    Returns:
        q_att: (B, H, C, k_max + 1, D) scaled queries rotated to ``q_pos - j * bs`` (j = 0..k_max);
        q_lm: (B, H, C, k_max + 1, D) rotated to ``q_pos - s * bs - (bs - 1)`` (s = 0..k_max);
        local_scores: (B, H, C, nb, bs) against the local context padded to whole blocks;
        lv: (B, Hkv, nb * bs, D) the local values, padded likewise.
    """
    batch, heads, rows, _ = q.shape
    kv_heads, t_local = local_k.shape[1], local_k.shape[2]
    bs, slots = rotations.block_size, rotations.slots
    pad = (bs - t_local % bs) % bs
    # The scale goes on the queries once (RoPE is linear), so every score below comes out scaled.
    q_all = apply_rope((q * scale)[:, :, :, None], rotations.cos_q, rotations.sin_q)  # (B, H, C, J, D)
    q_att, q_lm = q_all[:, :, :, :slots], q_all[:, :, :, slots:]
    lk = apply_rope(
        torch.nn.functional.pad(local_k, (0, 0, 0, pad)), rotations.cos_local, rotations.sin_local
    )
    lv = torch.nn.functional.pad(local_v, (0, 0, 0, pad))
    local_scores = _grouped(q_att[:, :, :, 0], kv_heads) @ lk[:, :, None].transpose(-1, -2)
    return q_att, q_lm, local_scores.reshape(batch, heads, rows, -1, bs), lv


def _decode_select(q_lm: Tensor, landmark_keys: Tensor, k: int) -> Tensor:
    """Top-k blocks per query row and head when every row holds the same number N >= k of blocks.

    Args:
        q_lm: (B, H, C, k + 1, D) queries rotated to the landmark slots 0..k (``_decode_local``).
        landmark_keys: (B, Hkv, N, D) un-rotated landmark keys in logical order; the last k are the
            most recent blocks, at slots 1..k in that order; all older ones are at slot 0.

    Returns:
        (B, H, C, k) logical block indices in ascending order.
    """
    batch, heads, rows, _, _ = q_lm.shape
    kv_heads, n = landmark_keys.shape[1], landmark_keys.shape[2]
    old = _landmark_scores(_grouped(q_lm[:, :, :, 0], kv_heads), landmark_keys[:, :, : n - k])
    recent = _landmark_scores_at_slots(_grouped(q_lm[:, :, :, 1:], kv_heads), landmark_keys[:, :, n - k :])
    scores = torch.cat((old, recent), dim=-1).reshape(batch, heads, rows, n)
    return top_k_blocks(scores, k)


def _bounded_select(q_lm: Tensor, landmark_keys: Tensor, k: int) -> tuple[Tensor, None, int]:
    """``_decode_select``'s selection, the old blocks searched through super-block bounds
    (:func:`landmark.inference.superblocks.bounded_top_k`: their top k, ties to the more recent) and the
    k recent ones scored at their slots; the top k of the union by the same rule. Returns (selected
    (B, H, C, k) ascending, None, landmarks scored)."""
    batch, heads, rows, _, dim = q_lm.shape
    kv_heads, n = landmark_keys.shape[1], landmark_keys.shape[2]
    recent_q = _grouped(q_lm[:, :, :, 1:], kv_heads)
    recent = _landmark_scores_at_slots(recent_q, landmark_keys[:, :, n - k :])  # (B, Hkv, G, C, k)
    recent = recent.reshape(batch, kv_heads, -1, k)
    cand = torch.arange(n - k, n, device=q_lm.device).expand(*recent.shape)
    scored = recent.numel() // kv_heads
    if n > k:
        q_old = _grouped(q_lm[:, :, :, 0], kv_heads).reshape(batch, kv_heads, -1, dim)
        old_keys = landmark_keys[:, :, : n - k]
        old, old_scores = bounded_candidates(q_old, old_keys, k)  # the old blocks' top k among them
        cand, recent = torch.cat((old, cand), dim=-1), torch.cat((old_scores, recent), dim=-1)
        scored += int((old >= 0).sum()) // kv_heads
    selected = top_k_candidates(cand, recent, k)
    return selected.reshape(batch, heads, rows, k), None, scored


def _decode_attend(
    q_att: Tensor,
    selected: Tensor,
    recent_from: Tensor,
    blocks: tuple[Tensor, Tensor],
    local: tuple[Tensor, Tensor],
    groups: tuple[Tensor, Tensor],
) -> Tensor:
    """One grouped softmax over each (query row, head)'s own k retrieved blocks and the local context.

    Args:
        q_att: (B, H, C, k_max + 1, D) from ``_decode_local``; selected: (B, H, C, k) logical indices,
            ascending; recent_from: (B, 1, 1, 1) first logical index among the k_eff most recent blocks
            (those sit one slot further right).
        blocks: keys (B, Hkv, M, D, bs) of the selected blocks as stored (key-major, rotated by their
            in-block offsets, the landmark's last; M = G * C * k, in the order of ``selected``) and
            values (B, Hkv, M, bs - 1, D) of their regular tokens.
        local: local_scores and lv from ``_decode_local``.
        groups: current (B, 1|H, C, k + nb, bs) and earlier (B, 1|H, C, k + nb), the group membership
            (``grouped_softmax``).

    Returns:
        (B, H, C, D).
    """
    (keys, values), (local_scores, lv), (current, earlier) = blocks, local, groups
    batch, heads, rows, k_sel = selected.shape
    kv_heads, dim, bs = keys.shape[1], keys.shape[-2], keys.shape[-1]
    rank = torch.arange(k_sel, device=selected.device)
    slot = rank + (selected >= recent_from).long()  # attention slot: chronological rank, +1 if recent
    # the keys carry their in-block offsets; the slot's position is on the query
    q_sel = q_att.gather(3, slot[..., None].expand(-1, -1, -1, -1, dim))  # (B, H, C, k, D) at q_pos - slot*bs
    mem_scores = (q_sel.reshape(batch, kv_heads, -1, 1, dim) @ keys).view(batch, heads, rows, k_sel, bs)
    scores = torch.cat((mem_scores, local_scores), dim=3)  # (B, H, C, k + nb, bs)
    weights = grouped_softmax(scores, current, earlier)  # (B, H, C, k + nb, bs)
    w_mem = weights[:, :, :, :k_sel, : bs - 1].reshape(batch, kv_heads, -1, 1, bs - 1)  # (B, Hkv, M, 1, bs-1)
    out = (w_mem @ values.to(w_mem.dtype)).view(batch, heads, rows, k_sel, dim).sum(3)
    return out + _apply(weights[:, :, :, k_sel:], lv, kv_heads)


_STAGES = {"local": _decode_local, "select": _decode_select, "attend": _decode_attend}


def _eager(name: str):
    return _STAGES[name]


@functools.cache
def _compiled(name: str):
    """The decode stage ``name`` compiled once per process (dynamic shapes: memory size, local length)."""
    return torch.compile(_STAGES[name], dynamic=True)


# --- Scoring and top-k --------------------------------------------------------------------------------------


def _rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate x (B, heads, T, D) by per-row integer positions (B, T)."""
    cos, sin = rope_angles(positions, x.shape[-1], base)  # (B, T, D/2)
    return apply_rope(x, cos[:, None], sin[:, None])


def _grouped(q: Tensor, kv_heads: int) -> Tensor:
    """(B, H, ...) -> (B, Hkv, G, ...): query heads grouped by the kv head they share."""
    b, h = q.shape[:2]
    return q.view(b, kv_heads, h // kv_heads, *q.shape[2:])


def select_blocks(
    scores: Tensor, n_blocks: Tensor, row_valid: Tensor, k: int, granularity: str
) -> tuple[Tensor, Tensor]:
    """Top-k memory blocks per selection unit.

    Args:
        scores: (B, H, C, N) landmark scores; entries of blocks >= n_blocks[b] are ignored.
        n_blocks: (B,) blocks in memory per row.
        row_valid: (B, C) which query rows are real (not padding).

    Returns:
        index: (B, H, C, k_max) logical block indices in chronological (ascending) order, valid first.
        valid: (B, H, C, k_max) which entries are real selections (row b has min(k, n_b) of them).
    """
    _batch, heads, rows, n = scores.shape
    k_max = min(k, n)
    block_ok = torch.arange(n, device=scores.device)[None, :] < n_blocks[:, None]  # (B, N)
    masked = scores.masked_fill(~block_ok[:, None, None, :], float("-inf"))
    if granularity == "token_head":
        pick = masked
    else:
        probs = torch.softmax(masked, dim=-1).nan_to_num(0.0)  # (B, H, C, N)
        if granularity == "token":
            pick = probs.mean(dim=1, keepdim=True).expand(-1, heads, -1, -1)
        else:  # "head": average over the real query rows of the step
            w = row_valid[:, None, :, None].to(probs.dtype)
            pick = ((probs * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)).expand(
                -1, -1, rows, -1
            )
        pick = pick.masked_fill(~block_ok[:, None, None, :], float("-inf"))
    # ascending; real blocks (finite) always win over masked ones (-inf), which have the highest indices
    top = top_k_blocks(pick, k_max)  # (B, H, C, k_max)
    valid = top < n_blocks[:, None, None, None]
    return torch.where(valid, top, torch.zeros_like(top)), valid


def top_k_blocks(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores along the last dimension, in ascending (chronological) order.

    Ties are broken deterministically: among equal scores the later (more recent) block wins. They are
    common: in the first layer every landmark key is the same (it depends on the landmark's embedding
    only), so all blocks at slot 0 score alike. ``torch.topk`` alone breaks ties in an unspecified
    order that changes with the size; the C++ retrieval kernel applies the same rule as here.

    Args:
        scores: (..., N) with N >= k.

    Returns:
        (..., k) int64.
    """
    n = scores.shape[-1]
    values, index = scores.topk(min(k + 1, n), dim=-1)
    top = index[..., :k]
    if n > k:  # the rule matters only where the k-th and (k+1)-th scores are equal: redo those rows
        tied_rows = (values[..., k - 1] == values[..., k]).nonzero(as_tuple=True)
        if tied_rows[0].numel():
            top = top.clone()
            top[tied_rows] = _top_k_recent_first(scores[tied_rows], k)
    return top.sort(dim=-1).values


def _top_k_recent_first(scores: Tensor, k: int) -> Tensor:
    """``top_k_blocks``'s rule for rows (R, N) whose k-th score is tied: (R, k) indices, any order."""
    kth = scores.topk(k, dim=-1).values[..., -1:]  # the k-th largest value
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(-1, keepdim=True)  # how many of the tied entries are taken
    from_end = tied.flip(-1).cumsum(-1).flip(-1)  # tied entries at this index or later
    chosen = above | (tied & (from_end <= need))  # exactly k per row
    index = torch.arange(scores.shape[-1], device=scores.device)
    return torch.where(chosen, index, -1).topk(k, dim=-1).values


def _landmark_scores(q: Tensor, landmark_keys: Tensor) -> Tensor:
    """Scores of queries (B, Hkv, G, C, D) against landmark keys (B, Hkv, N, D): (B, Hkv, G, C, N).

    Computed in float64 and rounded to the query dtype, so that equal keys get equal scores whatever the
    summation order of the product (a float32 matrix product rounds equal rows differently; float64
    sums of equal rows differ at most in their last bits, which the rounding removes except at a
    rounding boundary): ties, the rule in the first layer (every landmark key is the same there), are
    then broken by ``top_k_blocks``'s rule, as in the C++ retrieval kernel.
    """
    return (q.double() @ landmark_keys[:, :, None].double().transpose(-1, -2)).to(q.dtype)


def _landmark_scores_at_slots(q: Tensor, landmark_keys: Tensor) -> Tensor:
    """Queries rotated per slot (B, Hkv, G, C, k, D) against one landmark key per slot (B, Hkv, k, D):
    (B, Hkv, G, C, k), in float64 like ``_landmark_scores``."""
    return (q.double() * landmark_keys[:, :, None, None].double()).sum(-1).to(q.dtype)


def _apply(weights: Tensor, values: Tensor, kv_heads: int) -> Tensor:
    """weights (B, H, C, nb, bs) @ values (B, Hkv, nb*bs, D) -> (B, H, C, D), with GQA."""
    b, h, c = weights.shape[:3]
    w = weights.reshape(b, kv_heads, h // kv_heads, c, -1)
    return torch.einsum("bkgct,bktd->bkgcd", w, values.to(w.dtype)).reshape(b, h, c, -1)


# --- The optimised path: the fused C++ kernel ---------------------------------------------------------------


def _kernel_attention(
    inputs: LayerInputs, step: Step, plan: kernel.KernelPlan, stats: StepStats | None
) -> Tensor:
    """One call of the fused C++ kernel (``kernel.retrieval_step``). Where it does not select itself
    (granularities token and head, FAISS search) the reference selects and the kernel attends."""
    given = None if plan.selects else reference_selection(inputs, step)
    memory = inputs.memory
    out, selected = kernel.retrieval_step(inputs, step, plan, given)
    if stats is not None:
        stats.local_positions += int(step.local_len.sum())
        stats.landmarks_scored += sum(memory.count)
        stats.block_heads_fetched += int((selected >= 0).sum())
        stats.record(selected)
    return out
