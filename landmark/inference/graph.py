"""The retrieval step as one fixed graph of tensor operations: the launch-light path for GPUs.

``retrieval_attention``'s reference (``landmark.inference.retrieval``) decides shapes and branches
from the data of every step: the blocks each row holds, whether all rows are alike, where scores tie.
Each of those decisions reads a device tensor on the host (a synchronisation) and every decision adds
operations; on a GPU every operation is a kernel launch, and a chunk of 256 query rows cost about a
thousand of them per layer. This path computes the same step (the same selection, the same outputs to
rounding: tests/test_graph.py) from two kinds of inputs:

* what the host already knows, as Python integers: the blocks each row holds and where its ring
  buffer starts (``BlockMemory.count`` / ``start``), the stream and tail lengths, the new positions per
  row. ``plan_graph_step`` turns them, once per step, into the few index and mask tensors that every
  layer of the step shares (``GraphPlan``);
* the layer's tensors: queries, local keys and values, the block memory.

``graph_attention`` then runs a fixed sequence of tensor operations: the same number for every layer
and chunk whatever the batch rows, query rows or blocks in memory, with no host synchronisation and
no data-dependent shape. Rows that differ (ragged lengths, fewer than k blocks, a wrapped ring buffer)
are masked, not branched on; the top-k applies the reference's rule for ties (the more recent block
wins) to every row instead of finding the tied ones. It can be captured whole by
``torch.compile(fullgraph=True)`` (``RetrievalConfig.compile``) or a CUDA graph. The whole chunk is
one group of query rows: it gathers ``rows x heads x k`` blocks at once (``row_group`` only sets the
rows that the ``"head"`` granularity averages over, as in the reference).

``layer_step`` (what ``RetrievalConfig.compile`` compiles) wraps it with the rest of a layer's step:
the local context from the tail block and the new positions, the complete blocks written into the
memory (slots planned on the host as ``BlockMemory.claim`` gives them), the new tail block. Its
shapes depend only on the batch, the query rows, the memory's capacity (which grows geometrically)
and k: the local context is padded to ``block_size + rows`` positions, the scan covers every slot,
the writes are padded to the most blocks a step can complete.

Exact search only (``search="exact"``); FAISS and bounded search take the reference path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from landmark.inference import kernel
from landmark.inference.memory import BlockMemory, BlockStore, gather_blocks, ring_slots, store_blocks
from landmark.inference.retrieval import (
    Rotations,
    _decode_attend,
    _decode_local,
    _grouped,
    _landmark_scores,
    _landmark_scores_at_slots,
    _top_k_recent_first,
)
from landmark.inference.step import Selection

RECOMPILE_LIMIT = 64  # graphs compiled for layer_step at most (compiled_layer_step)


@dataclass(frozen=True)
class GraphConfig:
    """The static part of a step (hashable: a compiled graph is specialised on it)."""

    k: int  # K: blocks selected per query row and head (min(k, memory capacity); fewer held are masked)
    block_size: int
    granularity: str  # "token_head" | "token" | "head"
    row_group: int  # rows that the "head" granularity averages over
    scale: float
    # the complete blocks of the step: "none" complete, "store": written into the memory by the step,
    # "return": handed back to be written where the block contents live (another device)
    blocks: str = "store"
    fused: bool = False  # attend through the Triton kernel (landmark.inference.triton_retrieval)


class HostStep(NamedTuple):
    """What the host knows of a step (Python integers, one entry per batch row)."""

    tail: list[int]  # positions of the incomplete tail block before the step
    new: list[int]  # real new positions (query rows) in the step
    rows: int  # C: query rows of the step's tensors (>= max(new))
    count: list[int]  # blocks held in memory
    start: list[int]  # ring-buffer start of each row's blocks
    capacity: int  # physical block slots of the memory


class GraphPlan(NamedTuple):
    """Index and mask tensors shared by every layer of a step (``plan_graph_step``); K = ``GraphConfig.k``,
    N = scanned landmark columns, nb = local blocks."""

    rotations: Rotations  # queries to K + 1 attention slots and K + 1 landmark slots; local keys
    current: Tensor  # (B, 1, C, K + nb, bs) own-block local keys each query sees (after K memory blocks)
    earlier: Tensor  # (B, 1, C, K + nb) real selections and earlier local blocks, joined by landmark
    row_valid: Tensor  # (B, C) real query rows
    selection_valid: Tensor  # (B, 1, C, K) rank < min(k, blocks held) on real rows
    block_ok: Tensor  # (B, N) logical block index < blocks held
    order: Tensor | None  # (B, N) scanned column of logical block i (None: scan order is logical)
    recent: Tensor  # (B, K) scanned column of the block at landmark slot s = 1..K (0 if none)
    recent_column: Tensor  # (B, K) logical column its slot score replaces (N: a spare column)
    recent_from: Tensor  # (B, 1, 1, 1) first logical index among the k_eff most recent blocks
    start: Tensor | None  # (B, 1, 1) ring-buffer starts (None: no row has wrapped)
    local_index: Tensor  # (B, T) where local position t comes from in cat(tail block, new positions)
    tail_index: Tensor  # (B, bs) where the new tail's positions come from in the local context
    writes: Tensor  # (3, P) row, local block and memory slot of each complete block the step stores
    offset_angles: tuple[Tensor, Tensor]  # cos, sin (bs, D/2) of the in-block offsets (stored keys)


class MemoryTensors(NamedTuple):
    """A layer's block memory as ``graph_attention`` reads it (``BlockMemory``'s storage)."""

    # (B, Hkv, capacity, D) un-rotated, in storage order: the scan reads every slot (masked beyond each
    # row's blocks, so that shapes change only when the memory grows); the step writes its new ones
    landmark_keys: Tensor
    blocks: BlockStore  # keys (B, Hkv, capacity, D, bs) as stored (key-major, offset-rotated), values


class GraphStep(NamedTuple):
    """Everything the layers of one step share: built once by ``graph_step``."""

    host: HostStep
    config: GraphConfig
    plan: GraphPlan
    claims: list[tuple[list[int], list[int]]]  # per row: ``BlockMemory.claim``'s answer for this step
    tail_len: Tensor  # (B,) the new tail lengths, on the device


def graph_step(
    host: HostStep, retrieval, memory: BlockMemory, q: Tensor, scale: float, rope_base: float
) -> GraphStep:
    """The shared part of a step whose queries are ``q`` (B, H, C, D) over memories like ``memory``
    (every layer's holds the same blocks), read with ``retrieval`` (a ``RetrievalConfig``)."""
    bs = memory.block_size
    k = min(retrieval.k, host.capacity)  # fixed: rows holding fewer blocks mask the rest
    local_len = [t + n for t, n in zip(host.tail, host.new)]
    width = bs + host.rows  # every step with this many rows has local tensors of the same length
    local_index = [
        [j if j < t else min(bs + j - t, bs + host.rows - 1) for j in range(width)] for t in host.tail
    ]
    tail_index = [[min(n // bs * bs + j, width - 1) for j in range(bs)] for n in local_len]
    claims, writes = _claims(host, local_len, bs, len(host.count) * (width // bs))
    blocks = "none" if not writes[0] else "store" if memory.storage_device == memory.device else "return"
    fused = retrieval.kernel == "triton" and memory.storage_device == memory.device
    config = GraphConfig(k, bs, retrieval.granularity, retrieval.row_group, scale, blocks, fused)
    plan = plan_graph_step(host, config, width, q.shape[-1], rope_base)._replace(
        local_index=torch.tensor(local_index),
        tail_index=torch.tensor(tail_index),
        writes=torch.tensor(writes, dtype=torch.long).view(3, -1),
        offset_angles=memory.offset_angles(torch.device("cpu")),
    )
    tail_len = torch.tensor([n % bs for n in local_len], device=q.device)
    return GraphStep(host, config, _to(plan, q.device), claims, tail_len)


def _claims(host: HostStep, local_len: list[int], block_size: int, width: int):
    """Where every row's complete blocks go (``BlockMemory.claim``'s answers, per row), and the writes
    as (3, width) rows, local blocks, slots: padded to ``width`` with copies of the first write (the
    same block to the same slot again), so that the step's shapes do not depend on how many complete."""
    claims, writes = [], [[], [], []]
    for b, (n, c, s) in enumerate(zip(local_len, host.count, host.start)):
        kept, slots, _, _ = ring_slots(c, s, host.capacity, n // block_size)
        claims.append((kept, slots))
        writes[0] += [b] * len(kept)
        writes[1] += kept
        writes[2] += slots
    if writes[0]:
        writes = [w + w[:1] * (width - len(w)) for w in writes]
    return claims, writes


def count_reads(stats, step: GraphStep, heads: int, selected: Tensor) -> None:
    """Add what the step read to ``stats`` (a ``StepStats``, or None), from the host's integers: no
    synchronisation unless the selections are traced."""
    if stats is None:
        return
    host = step.host
    stats.local_positions += sum(host.tail) + sum(host.new)
    if any(host.count):
        stats.landmarks_scored += sum(host.count)
        stats.block_heads_fetched += heads * sum(
            n * min(c, step.config.k) for n, c in zip(host.new, host.count)
        )
        stats.record(selected)


def claim_blocks(step: GraphStep, memory: BlockMemory) -> None:
    """Account on the host for the blocks the step stores in ``memory`` (``BlockMemory.claim``), which
    must be where ``graph_step`` planned them."""
    for row, (kept, slots) in enumerate(step.claims):
        if memory.claim(row, len(kept) and kept[-1] + 1) != (kept, slots):
            raise RuntimeError("the block memory moved under a planned step (it must be reserved first)")


def plan_graph_step(
    host: HostStep, config: GraphConfig, local_width: int, head_dim: int, rope_base: float
) -> GraphPlan:
    """The attention's shared tensors (on the CPU) of a step whose local context tensors are
    ``local_width`` positions long (``graph_step`` adds the local context's and the store's indices)."""
    bs, big_k, rows = config.block_size, config.k, host.rows
    k_eff = torch.tensor([min(c, big_k) for c in host.count])  # K >= min(k, c) for every row
    tail, new = torch.tensor(host.tail), torch.tensor(host.new)
    c_idx = torch.arange(rows)
    row_valid = c_idx[None, :] < new[:, None]  # (B, C)
    q_local = tail[:, None] + c_idx  # (B, C)
    base = (k_eff + 1) * bs  # (B,) position of local position 0
    cos_t, sin_t = kernel.rope_table(max(big_k, 1), local_width, bs, head_dim, rope_base, torch.device("cpu"))
    j = torch.arange(big_k + 1)
    pos = (base[:, None, None] + q_local[:, :, None] - torch.cat((j * bs, j * bs + bs - 1))).clamp_min(0)
    nb_local = -(-local_width // bs)
    key_local = torch.arange(nb_local * bs)
    kpos = base[:, None] + key_local  # (B, T')
    angles = (cos_t[pos][:, None], sin_t[pos][:, None], cos_t[kpos][:, None], sin_t[kpos][:, None])
    rotations = Rotations(*angles, big_k + 1, bs)
    current, earlier, selection_valid = _groups(host, config, rows, key_local, row_valid, k_eff)
    n_scan = host.capacity  # the scan reads every slot
    logical = torch.arange(n_scan)
    start = torch.tensor(host.start)
    wrapped = any(host.start)
    order = (start[:, None] + logical) % max(host.capacity, 1) if wrapped else None
    count = torch.tensor(host.count)
    s = torch.arange(1, big_k + 1)
    recent = count[:, None] - 1 - k_eff[:, None] + s  # (B, K) logical index of the block at slot s
    ok = s <= k_eff[:, None]
    recent_scan = (recent + start[:, None]) % max(host.capacity, 1) if wrapped else recent
    return GraphPlan(
        rotations=rotations,
        current=current,
        earlier=earlier,
        row_valid=row_valid,
        selection_valid=selection_valid,
        block_ok=logical[None, :] < count[:, None],
        order=order,
        recent=torch.where(ok, recent_scan, 0),
        recent_column=torch.where(ok, recent, n_scan),
        recent_from=(count - k_eff)[:, None, None, None],
        start=start[:, None, None] if wrapped else None,
        local_index=None,
        tail_index=None,
        writes=None,
        offset_angles=None,
    )


def _groups(
    host: HostStep, config: GraphConfig, rows: int, key_local: Tensor, row_valid: Tensor, k_eff: Tensor
):
    """``grouped_softmax``'s ``current`` and ``earlier`` for K memory blocks followed by the local context
    (own block directly, earlier local blocks through their landmarks), and which selections are real."""
    bs, big_k, batch = config.block_size, config.k, len(host.count)
    tail, new = torch.tensor(host.tail), torch.tensor(host.new)
    local_len = tail + new
    nb_local = key_local.shape[0] // bs
    q_local = tail[:, None] + torch.arange(rows)
    visible = (key_local[None, None, :] < local_len[:, None, None]) & (
        key_local[None, None, :] <= q_local[:, :, None]
    )
    q_block = torch.div(q_local, bs, rounding_mode="floor")
    same_block = (key_local // bs)[None, None, :] == q_block[:, :, None]
    local_current = (visible & same_block & row_valid[:, :, None]).view(batch, 1, rows, nb_local, bs)
    local_earlier = (torch.arange(nb_local)[None, None, :] < q_block[:, :, None]) & row_valid[:, :, None]
    selection_valid = (torch.arange(big_k)[None, None, :] < k_eff[:, None, None]) & row_valid[:, :, None]
    current = torch.cat((torch.zeros(batch, 1, rows, big_k, bs, dtype=torch.bool), local_current), dim=3)
    earlier = torch.cat((selection_valid, local_earlier), dim=2)[:, None]
    return current, earlier, selection_valid[:, None]


def _to(plan: GraphPlan, device) -> GraphPlan:
    """The plan's tensors moved to ``device``."""
    move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
    rotations = Rotations(*map(move, plan.rotations))
    return plan._replace(
        **{f: move(getattr(plan, f)) for f in plan._fields[1:]}, rotations=rotations
    )._replace(offset_angles=tuple(map(move, plan.offset_angles)))


def memory_tensors(memory: BlockMemory) -> MemoryTensors:
    """The storage ``graph_attention`` reads and writes: landmark keys and block contents."""
    return MemoryTensors(memory.landmark_keys, memory.blocks)


# --- The step -----------------------------------------------------------------------------------------------


def layer_step(
    q: Tensor,
    new: tuple[Tensor, Tensor],
    tail: tuple[Tensor, Tensor],
    memory: MemoryTensors,
    plan: GraphPlan,
    config: GraphConfig,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """One layer's whole step: the local context, ``graph_attention``, the complete blocks written to
    the memory (``config.store``) and the new tail block. What ``torch.compile`` captures as one graph.

    Args:
        q: (B, H, C, D) un-rotated queries; new: keys and values (B, Hkv, C, D) of the new positions,
            un-rotated; tail: the tail block's keys and values (B, Hkv, bs, D).

    Returns:
        outputs (B, H, C, D), selected (B, H, C, K) (``graph_attention``), the new tail block's keys
        and values (B, Hkv, bs, D), and None, or where the block contents live elsewhere
        (``config.blocks == "return"``) the complete blocks' keys and values for ``BlockMemory.write``.
    """
    index = plan.local_index[:, None, :, None].expand(-1, new[0].shape[1], -1, new[0].shape[3])
    local_k = torch.cat((tail[0], new[0]), dim=2).gather(2, index)
    local_v = torch.cat((tail[1], new[1]), dim=2).gather(2, index)
    out, selected = graph_attention(q, local_k, local_v, memory, plan, config)
    pending = None
    if config.blocks != "none":
        pending = complete_blocks(local_k, local_v, plan, config.block_size)
    if config.blocks == "store":
        rows, slots = plan.writes[0], plan.writes[2]
        memory.landmark_keys[rows, :, slots] = pending[0][:, :, -1].to(memory.landmark_keys.dtype)
        store_blocks(memory.blocks, (rows, slots), *pending, plan.offset_angles)
        pending = None
    index = plan.tail_index[:, None, :, None].expand(-1, local_k.shape[1], -1, local_k.shape[3])
    return out, selected, (local_k.gather(2, index), local_v.gather(2, index)), pending


def complete_blocks(
    local_k: Tensor, local_v: Tensor, plan: GraphPlan, block_size: int
) -> tuple[Tensor, Tensor]:
    """(P, Hkv, bs, D) keys and values of the complete blocks the step stores (``plan.writes``)."""
    nb = local_k.shape[2] // block_size
    kb = local_k[:, :, : nb * block_size].unflatten(2, (nb, block_size))  # (B, Hkv, nb, bs, D)
    vb = local_v[:, :, : nb * block_size].unflatten(2, (nb, block_size))
    rows, blocks = plan.writes[0], plan.writes[1]
    return kb[rows, :, blocks], vb[rows, :, blocks]


def graph_attention(
    q: Tensor, local_k: Tensor, local_v: Tensor, memory: MemoryTensors, plan: GraphPlan, config: GraphConfig
) -> tuple[Tensor, Tensor]:
    """Retrieval attention of a chunk's queries in a fixed sequence of tensor operations.

    Args:
        q: (B, H, C, D) un-rotated queries of the new positions.
        local_k, local_v: (B, Hkv, T, D) un-rotated keys and values of the local context (tail block,
            then the new positions).
        memory: the layer's block memory (``memory_tensors``); plan: the step's ``plan_graph_step``.

    Returns:
        (B, H, C, D) outputs (padding rows are zero) and the (B, H, C, K) selected logical block
        indices, ascending, -1 where a row holds fewer than K blocks and on padding rows.
    """
    q_att, q_lm, local_scores, lv = _decode_local(q, local_k, local_v, plan.rotations, config.scale)
    scores = _scan_scores(q_lm, memory.landmark_keys, plan)
    selected = _top_k(_pick(scores, plan, config), config.k)
    chosen = torch.where(plan.selection_valid, selected, 0)
    local, groups = (local_scores, lv), (plan.current, plan.earlier)
    if config.fused:  # the selected blocks read where they are stored, in one kernel
        selection = Selection(chosen, plan.selection_valid, plan.recent_from, plan.start)
        out = _triton().attend_selected(q_att, selection, memory.blocks, local, groups)
        return out, torch.where(plan.selection_valid, selected, -1)
    blocks = gather_blocks(memory.blocks, _physical(chosen, plan, memory.blocks.keys), q.dtype)
    if memory.blocks.keys.device != q.device:  # block contents kept in another device's memory
        blocks = tuple(t.to(q.device) for t in blocks)
    out = _decode_attend(q_att, chosen, plan.recent_from, blocks, local, groups)
    return out, torch.where(plan.selection_valid, selected, -1)


def _triton():
    """``landmark.inference.triton_retrieval`` (it imports triton: the gpu extra)."""
    from landmark.inference import triton_retrieval

    return triton_retrieval


def _scan_scores(q_lm: Tensor, scan: Tensor, plan: GraphPlan) -> Tensor:
    """(B, H, C, N) landmark scores in logical order: every block at slot 0, the k_eff most recent
    re-scored at their slots 1..k_eff; -inf beyond the blocks a row holds."""
    batch, heads, rows, _, dim = q_lm.shape
    kv_heads, n = scan.shape[1], scan.shape[2]
    old = _landmark_scores(_grouped(q_lm[:, :, :, 0], kv_heads), scan)  # (B, Hkv, G, C, N)
    if plan.order is not None:
        old = old.gather(-1, plan.order[:, None, None, None, :].expand(old.shape))
    recent_keys = scan.gather(
        2, plan.recent[:, None, :, None].expand(-1, kv_heads, -1, dim)
    )  # (B, Hkv, K, D)
    recent = _landmark_scores_at_slots(
        _grouped(q_lm[:, :, :, 1:], kv_heads), recent_keys
    )  # (B, Hkv, G, C, K)
    column = plan.recent_column[:, None, None, None, :].expand(recent.shape)
    scores = torch.cat((old, old[..., :1]), dim=-1).scatter(-1, column, recent)[..., :n]
    return scores.reshape(batch, heads, rows, n).masked_fill(~plan.block_ok[:, None, None, :], float("-inf"))


def _pick(scores: Tensor, plan: GraphPlan, config: GraphConfig) -> Tensor:
    """What the top-k ranks at the configured granularity (``select_blocks``'s rule): the scores per row
    and head, the heads' landmark probabilities averaged (``"token"``) or the probabilities averaged over
    each group of ``row_group`` real query rows (``"head"``)."""
    if config.granularity == "token_head":
        return scores
    batch, heads, rows, n = scores.shape
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if config.granularity == "token":
        pick = probs.mean(dim=1, keepdim=True).expand(-1, heads, -1, -1)
    else:
        rg = config.row_group
        groups = -(-rows // rg)
        w = plan.row_valid[:, None, :, None].to(probs.dtype)  # (B, 1, C, 1)
        pad = (0, 0, 0, groups * rg - rows)
        num = torch.nn.functional.pad(probs * w, pad).view(batch, heads, groups, rg, n).sum(3, keepdim=True)
        den = torch.nn.functional.pad(w, pad).view(batch, 1, groups, rg, 1).sum(3, keepdim=True).clamp_min(1)
        pick = (num / den).expand(-1, -1, -1, rg, -1).reshape(batch, heads, groups * rg, n)[:, :, :rows]
    return pick.masked_fill(~plan.block_ok[:, None, None, :], float("-inf"))


def _top_k(pick: Tensor, k: int) -> Tensor:
    """(..., k) indices of the k largest entries, ascending; among equal entries the later wins (the
    reference's ``top_k_blocks`` rule, applied to every row: no search for the tied ones)."""
    return _top_k_recent_first(pick, k).sort(dim=-1).values


def _physical(logical: Tensor, plan: GraphPlan, keys: Tensor) -> Tensor:
    """(B, H, C, K) logical block indices -> (B, Hkv, G * C * K) storage slots of ``keys``' kv heads."""
    batch, kv_heads, capacity = keys.shape[:3]
    slots = logical if plan.start is None else (logical + plan.start[..., None]) % capacity
    return slots.reshape(batch, kv_heads, -1)


@functools.cache
def compiled_layer_step():
    """``layer_step`` compiled once per process: the whole layer step as one graph (``fullgraph``), with
    dynamic shapes so that chunks of other lengths and a growing memory reuse it."""
    compiled = torch.compile(layer_step, fullgraph=True)

    def step(*args):
        # one graph per kind of step (chunk, last chunk, decode; blocks completed or not; ring wrapped
        # or not), more than dynamo's default limit of 8 recompilations
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)

    return step
