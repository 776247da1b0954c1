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

``commit_blocks`` moves the chunk's complete blocks into the memory and keeps the rest as the tail, with
a fixed number of operations too (the slots come from ``BlockMemory.claim`` on the host).

Exact search only (``search="exact"``); FAISS and bounded search take the reference path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from landmark.inference import kernel
from landmark.inference.memory import BlockMemory, gather_blocks
from landmark.inference.retrieval import (
    Rotations,
    _apply,
    _decode_attend,
    _decode_local,
    _grouped,
    _landmark_scores,
    _landmark_scores_at_slots,
    _top_k_recent_first,
)
from landmark.ops.reference import grouped_softmax


@dataclass(frozen=True)
class GraphConfig:
    """The static part of a step (hashable: a compiled graph is specialised on it)."""

    k: int  # K: blocks selected per query row and head (min(k, blocks held by the fullest row))
    block_size: int
    granularity: str  # "token_head" | "token" | "head"
    row_group: int  # rows that the "head" granularity averages over
    scale: float


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


class MemoryTensors(NamedTuple):
    """A layer's block memory as ``graph_attention`` reads it (``BlockMemory``'s storage)."""

    scan: Tensor  # (B, Hkv, N, D) landmark keys of the scanned slots, in storage order, un-rotated
    keys: Tensor  # (B, Hkv, capacity, D, bs) as stored (key-major, offset-rotated)
    values: Tensor  # (B, Hkv, capacity, bs - 1, D)


class GraphStep(NamedTuple):
    """Everything the layers of one step share: built once by ``graph_step``."""

    host: HostStep
    config: GraphConfig
    plan: GraphPlan
    local_index: Tensor | None  # (B, T) where local position t comes from in cat(tail, new) (None: a slice)
    tail_index: Tensor  # (B, bs) where the new tail's positions come from in the local context
    tail_len: Tensor  # (B,) the new tail lengths, on the device


def graph_step(
    host: HostStep, retrieval, block_size: int, q: Tensor, scale: float, rope_base: float
) -> GraphStep:
    """The shared part of a step whose queries are ``q`` (B, H, C, D), read with ``retrieval``
    (a ``RetrievalConfig``): the static configuration, the plan and the local context's indices."""
    k = min(retrieval.k, max(host.count, default=0))
    config = GraphConfig(k, block_size, retrieval.granularity, retrieval.row_group, scale)
    local_len = [t + n for t, n in zip(host.tail, host.new)]
    width = max(local_len)
    local_index = None
    if len(set(host.tail)) > 1 or min(host.new) < host.rows:  # tails differ or rows are padded
        local_index = torch.tensor(
            [[j if j < t else block_size + j - t for j in range(width)] for t in host.tail]
        )
        local_index = local_index.clamp_max(block_size + host.rows - 1).to(q.device)
    else:
        width = host.tail[0] + host.rows
    full = [n // block_size * block_size for n in local_len]
    tail_index = torch.tensor(
        [[min(f + j, width - 1) for j in range(block_size)] for f in full], device=q.device
    )
    tail_len = torch.tensor([n % block_size for n in local_len], device=q.device)
    plan = plan_graph_step(host, config, width, q.shape[-1], rope_base, q.device)
    return GraphStep(host, config, plan, local_index, tail_index, tail_len)


def local_context(
    step: GraphStep, tail_k: Tensor, tail_v: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """(B, Hkv, T, D) keys and values of the local context: each row's tail block, then its new
    positions (tail_k, tail_v: (B, Hkv, bs, D); k, v: (B, Hkv, C, D))."""
    if step.local_index is None:  # one tail length, no padding: a slice and a concatenation
        t = step.host.tail[0]
        return torch.cat((tail_k[:, :, :t], k), dim=2), torch.cat((tail_v[:, :, :t], v), dim=2)
    index = step.local_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return torch.cat((tail_k, k), dim=2).gather(2, index), torch.cat((tail_v, v), dim=2).gather(2, index)


def count_reads(stats, step: GraphStep, heads: int, selected: Tensor) -> None:
    """Add what the step read to ``stats`` (a ``StepStats``, or None), from the host's integers: no
    synchronisation unless the selections are traced."""
    if stats is None:
        return
    host = step.host
    stats.local_positions += sum(host.tail) + sum(host.new)
    if step.config.k:
        stats.landmarks_scored += sum(host.count)
        stats.block_heads_fetched += heads * sum(
            n * min(c, step.config.k) for n, c in zip(host.new, host.count)
        )
        stats.record(selected)


def commit_blocks(
    step: GraphStep, memory: BlockMemory, local_k: Tensor, local_v: Tensor
) -> tuple[Tensor, Tensor]:
    """Move the complete blocks of the local context into ``memory`` (slots from ``BlockMemory.claim``,
    one indexed write per tensor) and return the new tail blocks (B, Hkv, bs, D) keys and values."""
    bs = memory.block_size
    local_len = [t + n for t, n in zip(step.host.tail, step.host.new)]
    memory.reserve(max(c + n // bs for c, n in zip(memory.count, local_len)))
    rows, blocks, slots = [], [], []
    for b, n in enumerate(local_len):
        kept, where = memory.claim(b, n // bs)
        rows += [b] * len(kept)
        blocks += kept
        slots += where
    if slots:
        index = torch.tensor([rows, blocks, slots], device=local_k.device)
        nb = local_k.shape[2] // bs
        kb = local_k[:, :, : nb * bs].unflatten(2, (nb, bs))  # (B, Hkv, nb, bs, D)
        vb = local_v[:, :, : nb * bs].unflatten(2, (nb, bs))
        memory.write(index[0], index[2], kb[index[0], :, index[1]], vb[index[0], :, index[1]])
    tail = step.tail_index[:, None, :, None].expand(-1, local_k.shape[1], -1, local_k.shape[3])
    return local_k.gather(2, tail), local_v.gather(2, tail)


def plan_graph_step(
    host: HostStep, config: GraphConfig, local_width: int, head_dim: int, rope_base: float, device
) -> GraphPlan:
    """The shared tensors of a step whose local context tensors are ``local_width`` positions long
    (built on the host from ``host``'s integers, then moved to ``device`` in one copy per tensor)."""
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
    n_scan = _scanned(host)
    logical = torch.arange(n_scan)
    start = torch.tensor(host.start)
    wrapped = any(host.start)
    order = (start[:, None] + logical) % max(host.capacity, 1) if wrapped else None
    count = torch.tensor(host.count)
    s = torch.arange(1, big_k + 1)
    recent = count[:, None] - 1 - k_eff[:, None] + s  # (B, K) logical index of the block at slot s
    ok = s <= k_eff[:, None]
    recent_scan = (recent + start[:, None]) % max(host.capacity, 1) if wrapped else recent
    plan = GraphPlan(
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
    )
    return _to(plan, device)


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


def _scanned(host: HostStep) -> int:
    """Landmark columns the scan reads: the fullest row's blocks, or every slot once a ring has wrapped."""
    return host.capacity if any(host.start) else max(host.count, default=0)


def _to(plan: GraphPlan, device) -> GraphPlan:
    move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
    return GraphPlan(*(Rotations(*map(move, v)) if isinstance(v, Rotations) else move(v) for v in plan))


def memory_tensors(memory: BlockMemory, host: HostStep) -> MemoryTensors:
    """The storage ``graph_attention`` reads: the scanned landmark slots and the whole key/value store."""
    return MemoryTensors(memory.landmark_keys[:, :, : _scanned(host)], memory.keys, memory.values)


# --- The step -----------------------------------------------------------------------------------------------


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
    kv_heads = local_k.shape[1]
    q_att, q_lm, local_scores, lv = _decode_local(q, local_k, local_v, plan.rotations, config.scale)
    if config.k == 0:
        weights = grouped_softmax(local_scores, plan.current, plan.earlier)
        return _apply(weights, lv, kv_heads), q.new_full((*q.shape[:3], 0), -1, dtype=torch.long)
    scores = _scan_scores(q_lm, memory.scan, plan)
    selected = _top_k(_pick(scores, plan, config), config.k)
    chosen = torch.where(plan.selection_valid, selected, 0)
    blocks = gather_blocks(memory.keys, memory.values, _physical(chosen, plan, memory.keys))
    if memory.keys.device != q.device:  # block contents kept in another device's memory
        blocks = tuple(t.to(q.device) for t in blocks)
    local = (local_scores, lv)
    out = _decode_attend(q_att, chosen, plan.recent_from, blocks, local, (plan.current, plan.earlier))
    return out, torch.where(plan.selection_valid, selected, -1)


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
def compiled_graph_attention():
    """``graph_attention`` compiled once per process: the whole layer step as one graph (``fullgraph``),
    dynamic shapes so that chunks of other lengths and a growing memory reuse it."""
    return torch.compile(graph_attention, fullgraph=True, dynamic=True)
