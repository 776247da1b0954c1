"""Top-k block retrieval through the landmarks, and attention over retrieved blocks + local context.

For a step that adds ``c_b`` new positions to each batch row ``b`` (a chunk during prefill, one or two
positions while decoding), every layer:

1. scores the new queries against the landmark keys of all blocks in its memory;
2. selects the top-k blocks (``k_eff = min(k, blocks in memory)``, per row) at one of three
   granularities (shared/method.md section 4, paper Table 2):

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

Retrieved blocks are gathered once per step by block index (the union of the selections of a group
of query rows) and scored with batched matmuls; a query's per-slot rotation is applied to the query,
not to a per-query copy of the keys, so no (rows, k, block, head_dim) tensor is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from landmark.inference.memory import BlockMemory
from landmark.model import apply_rope, rope_angles
from landmark.ops.reference import grouped_softmax

GRANULARITIES = ("token_head", "token", "head")


@dataclass
class RetrievalConfig:
    k: int = 4  # blocks retrieved per selection unit
    granularity: str = "token_head"  # "token_head" | "token" | "head"
    row_group: int = 64  # query rows whose retrieved blocks are gathered together (bounds memory)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (blocks retrieved per query) must be an integer >= 1; got {self.k!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if self.row_group < 1:
            raise ValueError(f"row_group must be >= 1; got {self.row_group}")


@dataclass
class StepStats:
    """What one layer step read (for benchmarks): landmark keys scored and distinct blocks fetched."""

    landmarks_scored: int = 0
    blocks_fetched: int = 0
    local_positions: int = 0


def _rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate x (B, heads, T, D) by per-row integer positions (B, T)."""
    cos, sin = rope_angles(positions, x.shape[-1], base)  # (B, T, D/2)
    return apply_rope(x, cos[:, None], sin[:, None])


def _grouped(q: Tensor, kv_heads: int) -> Tensor:
    """(B, H, T, D) -> (B, Hkv, G, T, D)."""
    b, h, t, d = q.shape
    return q.view(b, kv_heads, h // kv_heads, t, d)


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
    top = pick.topk(k_max, dim=-1).indices  # (B, H, C, k_max)
    k_eff = torch.clamp(n_blocks, max=k)  # (B,)
    valid = torch.arange(k_max, device=scores.device) < k_eff[:, None, None, None]
    # topk returns the best first; the first k_eff are real. Sort those chronologically, invalid last.
    top = torch.where(valid, top, torch.full_like(top, n))
    top = top.sort(dim=-1).values
    valid = top < n
    return torch.where(valid, top, torch.zeros_like(top)), valid


def retrieval_attention(
    q: Tensor,
    local_k: Tensor,
    local_v: Tensor,
    local_len: Tensor,
    q_start: Tensor,
    q_len: Tensor,
    memory: BlockMemory | None,
    retrieval: RetrievalConfig,
    block_size: int,
    rope_base: float,
    scale: float,
    stats: StepStats | None = None,
) -> Tensor:
    """Landmark attention of new queries over retrieved memory blocks and the local context.

    Args:
        q: (B, H, C, D) un-rotated queries of the new positions (row b has q_len[b] real ones).
        local_k, local_v: (B, Hkv, T, D) un-rotated keys/values of the local context: the incomplete
            tail block followed by the new positions; row b has local_len[b] real positions. Local
            position 0 is a block boundary.
        q_start: (B,) local position of each row's first query (= its tail length).
        memory: the layer's block memory (None or empty: local attention only).

    Returns:
        (B, H, C, D) attention outputs; padding rows are zero.
    """
    batch, heads, rows, head_dim = q.shape
    kv_heads, t_local = local_k.shape[1], local_k.shape[2]
    bs = block_size
    dev = q.device
    n_blocks = torch.tensor(memory.count if memory is not None else [0] * batch, device=dev)
    k_eff = torch.clamp(n_blocks, max=retrieval.k)
    base = (k_eff + 1) * bs  # (B,) position of local position 0
    q_local = q_start[:, None] + torch.arange(rows, device=dev)[None, :]  # (B, C) local positions
    row_valid = torch.arange(rows, device=dev)[None, :] < q_len[:, None]  # (B, C)
    q_pos = base[:, None] + q_local  # (B, C) absolute positions of the queries

    # Local context, padded to whole blocks: (B, H, C, nb_local, bs) scores.
    nb_local = -(-t_local // bs)
    pad = nb_local * bs - t_local
    key_local_pos = torch.arange(nb_local * bs, device=dev)  # (T',)
    lk = torch.nn.functional.pad(local_k, (0, 0, 0, pad))
    lv = torch.nn.functional.pad(local_v, (0, 0, 0, pad))
    lk_rot = _rope(lk, base[:, None] + key_local_pos[None, :], rope_base)
    q_rot = _rope(q, q_pos, rope_base)  # (B, H, C, D)
    local_scores = torch.einsum("bkgcd,bktd->bkgct", _grouped(q_rot, kv_heads), lk_rot) * scale
    local_scores = local_scores.reshape(batch, heads, rows, nb_local, bs)
    key_real = key_local_pos[None, :] < local_len[:, None]  # (B, T')
    visible = key_real[:, None, :] & (key_local_pos[None, None, :] <= q_local[:, :, None])  # (B, C, T')
    q_block = torch.div(q_local, bs, rounding_mode="floor")  # (B, C)
    same_block = (key_local_pos // bs)[None, None, :] == q_block[:, :, None]
    local_current = (visible & same_block & row_valid[:, :, None]).view(batch, 1, rows, nb_local, bs)
    local_earlier = torch.arange(nb_local, device=dev)[None, None, :] < q_block[:, :, None]  # complete
    local_earlier = (local_earlier & row_valid[:, :, None])[:, None]  # (B, 1, C, nb_local)

    if stats is not None:
        stats.local_positions += int(local_len.sum())
    if memory is None or int(n_blocks.max()) == 0:
        weights = grouped_softmax(local_scores, local_current, local_earlier)
        return _apply(weights, lv, kv_heads)

    # 1-2. Score every landmark in memory, with the scoring positions, and select.
    landmark_keys = memory.landmarks()  # (B, Hkv, N, D)
    n_max = landmark_keys.shape[2]
    logical = torch.arange(n_max, device=dev)[None, :]
    age = n_blocks[:, None] - 1 - logical  # 0 = most recent
    score_slot = torch.where(age < k_eff[:, None], k_eff[:, None] - age, torch.zeros_like(age))
    lm_rot = _rope(landmark_keys, score_slot * bs + bs - 1, rope_base)
    lm_scores = torch.einsum("bkgcd,bknd->bkgcn", _grouped(q_rot, kv_heads), lm_rot) * scale
    lm_scores = lm_scores.reshape(batch, heads, rows, n_max)
    selected, sel_valid = select_blocks(lm_scores, n_blocks, row_valid, retrieval.k, retrieval.granularity)
    if stats is not None:
        stats.landmarks_scored += int(n_blocks.sum())
    # Attention slot of each selection: its chronological rank, +1 if among the k_eff most recent.
    rank = torch.arange(selected.shape[-1], device=dev)
    recent = selected >= (n_blocks - k_eff)[:, None, None, None]
    slot = rank + recent.long()  # (B, H, C, k_max)

    out = torch.zeros(batch, heads, rows, head_dim, dtype=q.dtype, device=dev)
    for r0 in range(0, rows, retrieval.row_group):
        r1 = min(rows, r0 + retrieval.row_group)
        sl = slice(r0, r1)
        union, union_ok = _union(selected[:, :, sl], sel_valid[:, :, sl])  # (B, U)
        if stats is not None:
            stats.blocks_fetched += int(union_ok.sum())
        # slot of union block u for each query row (-1: not selected by that row/head)
        match = (selected[:, :, sl, :, None] == union[:, None, None, None, :]) & sel_valid[:, :, sl, :, None]
        match = match & union_ok[:, None, None, None, :]
        slot_map = ((slot[:, :, sl, :, None] + 1) * match).sum(-2) - 1  # (B, H, c, U)

        mem_k, mem_v = memory.gather(union)  # (B, Hkv, U, bs-1, D)
        mem_k = torch.cat((mem_k, memory.landmarks_at(union)[:, :, :, None]), dim=3)  # landmark last
        mem_v = torch.nn.functional.pad(mem_v, (0, 0, 0, 1))  # (B, Hkv, U, bs, D), landmark value 0
        n_union = union.shape[1]
        offsets = torch.arange(bs, device=dev).repeat(n_union)  # in-block offset of each key
        mem_k = _rope(
            mem_k.reshape(batch, kv_heads, n_union * bs, head_dim), offsets.expand(batch, -1), rope_base
        )
        mem_scores = torch.zeros(batch, heads, r1 - r0, n_union, bs, dtype=q.dtype, device=dev)
        for j in range(int(slot_map.max()) + 1):  # rotate the queries once per slot
            qj = _rope(q[:, :, sl], q_pos[:, sl] - j * bs, rope_base)
            sj = torch.einsum("bkgcd,bktd->bkgct", _grouped(qj, kv_heads), mem_k) * scale
            sj = sj.reshape(batch, heads, r1 - r0, n_union, bs)
            mem_scores = torch.where((slot_map == j)[..., None], sj, mem_scores)

        scores = torch.cat((mem_scores, local_scores[:, :, sl]), dim=3)
        current = torch.cat(
            (
                torch.zeros(batch, 1, r1 - r0, n_union, bs, dtype=torch.bool, device=dev),
                local_current[:, :, sl],
            ),
            dim=3,
        )
        earlier = torch.cat(((slot_map >= 0), local_earlier[:, :, sl].expand(-1, heads, -1, -1)), dim=3)
        weights = grouped_softmax(scores, current, earlier)  # (B, H, c, U + nb_local, bs)
        values = torch.cat((mem_v, lv.view(batch, kv_heads, nb_local, bs, head_dim)), dim=2)
        out[:, :, sl] = _apply(weights, values.reshape(batch, kv_heads, -1, head_dim), kv_heads)
    return out


def _union(selected: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per batch row, the distinct selected blocks: (B, U) indices (padded with 0) and a validity mask."""
    rows = [torch.unique(selected[b][valid[b]]) for b in range(selected.shape[0])]
    width = max(1, max(len(r) for r in rows))
    union = torch.zeros(len(rows), width, dtype=torch.long, device=selected.device)
    ok = torch.zeros(len(rows), width, dtype=torch.bool, device=selected.device)
    for b, r in enumerate(rows):
        union[b, : len(r)] = r
        ok[b, : len(r)] = True
    return union, ok


def _apply(weights: Tensor, values: Tensor, kv_heads: int) -> Tensor:
    """weights (B, H, C, nb, bs) @ values (B, Hkv, nb*bs, D) -> (B, H, C, D), with GQA."""
    b, h, c = weights.shape[:3]
    w = weights.reshape(b, kv_heads, h // kv_heads, c, -1)
    return torch.einsum("bkgct,bktd->bkgcd", w, values.to(w.dtype)).reshape(b, h, c, -1)
