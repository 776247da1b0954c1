"""Exact, memory-efficient landmark attention for the CPU (and any device PyTorch runs on).

The queries are processed in tiles of whole blocks. For a tile we compute its scores against every
visible key, viewed as (rows, key_blocks, block_size), and evaluate the grouped softmax in closed
form with per-(row, block) statistics::

    m_g   = max of the visible regular scores of block g          (in-block max)
    E_ij  = exp(s_ij - m_g),   r_g = sum_j E_ij                    (in-block softmax numerator, sum)
    group logits: s_{i,l_g} for earlier blocks g, m_c + log r_c for the current block c
    LSE_i = logsumexp(group logits)                                (saved for the backward pass)
    A_ij  = E_ij * c_g,  c_g = exp(s_{i,l_g} - LSE_i) / r_g  (earlier)  or  exp(m_c - LSE_i)  (current)

The backward pass recomputes the tile from (q, k, v, LSE) instead of saving any len x len tensor.
With ``dA = dO V^T`` and ``w_g = sum_{j in g} A_ij dA_ij`` (so ``D_i = sum_g w_g = dO_i . out_i``)::

    ds_ij     = A_ij (dA_ij - D_i)                  j in the current block
    ds_ij     = A_ij (dA_ij - w_g / P_g)            j a regular token of earlier block g, P_g = c_g r_g
    ds_{i,l_g} = w_g - P_g D_i                      the landmark of earlier block g

Memory is O(len x tile_rows) with ``tile_rows = max(block_size, TILE_SCORES / len)`` rounded to blocks.
Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from landmark.config import BLOCKWISE_TILE_SCORES


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tiles(q_len: int, k_len: int, block_size: int, tile_scores: int) -> list[tuple[int, int]]:
    """Split query rows into tiles whose key positions start and end on block boundaries.

    Returns a list of (row_start, row_end). Query row r sits at key position ``k_len - q_len + r``.
    """
    offset = k_len - q_len
    k_len_padded = -(-k_len // block_size) * block_size
    blocks_per_tile = max(1, tile_scores // (block_size * k_len_padded))
    span = blocks_per_tile * block_size
    tiles = []
    pos = offset
    while pos < k_len:
        end = min((pos // span + 1) * span, k_len)
        tiles.append((pos - offset, end - offset))
        pos = end
    return tiles


class _Tile:
    """Recomputable state of one query tile: the weights A and the per-block statistics."""

    def __init__(
        self,
        q_tile: Tensor,  # (B, Hkv, G, rows, D)
        k: Tensor,  # (B, Hkv, Tk_padded, D)
        row_pos: Tensor,  # (rows,) key position of each query row
        block_size: int,
        scale: float,
        lse: Tensor | None,  # (B, Hkv, G, rows) if known (backward), else None
    ):
        batch, kv_heads, group, rows, head_dim = q_tile.shape
        bs = block_size
        first_block = int(row_pos[0]) // bs
        n_key_blocks = int(row_pos[-1]) // bs + 1
        keys = n_key_blocks * bs
        self.rows, self.keys = rows, keys

        # s = q k^T * scale, viewed as (B, Hkv, G, rows, key_blocks, block_size).
        q2 = q_tile.reshape(batch, kv_heads, group * rows, head_dim)
        s = torch.matmul(q2, k[:, :, :keys].transpose(-1, -2)).mul_(scale)
        s = s.view(batch, kv_heads, group, rows, n_key_blocks, bs)
        self.landmark_scores = s[..., bs - 1].clone()  # (B, Hkv, G, rows, nb)

        # Visible regular tokens: causal and not a landmark. Blocks before the tile's first block are
        # fully visible to every row, so only their landmark column is masked; the rest gets a mask.
        s[..., :first_block, bs - 1] = float("-inf")
        k_pos = torch.arange(first_block * bs, keys, device=s.device)
        hidden = (k_pos[None, :] > row_pos[:, None]) | (k_pos[None, :] % bs == bs - 1)  # (rows, keys')
        diag = s.view(batch, kv_heads, group, rows, keys)[..., first_block * bs :]
        diag.masked_fill_(hidden, float("-inf"))

        m = s.amax(dim=-1)  # (B, Hkv, G, rows, nb): in-block max, -inf for an empty block
        m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
        e = s.sub_(m.unsqueeze(-1)).exp_()  # E, in place
        r = e.sum(dim=-1)  # (B, Hkv, G, rows, nb)

        q_block = torch.div(row_pos, bs, rounding_mode="floor")[:, None]  # (rows, 1)
        k_block = torch.arange(n_key_blocks, device=s.device)[None, :]  # (1, nb)
        self.earlier = k_block < q_block  # (rows, nb)
        self.current = k_block == q_block  # (rows, nb)
        neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
        if lse is None:
            current_lse = torch.where(r > 0, m + torch.log(r), neg_inf)
            group_logits = torch.where(
                self.earlier, self.landmark_scores, torch.where(self.current, current_lse, neg_inf)
            )
            lse = torch.logsumexp(group_logits, dim=-1)  # (B, Hkv, G, rows)
        self_lse = torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
        lse_b = self_lse.unsqueeze(-1)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        coef_earlier = torch.exp(self.landmark_scores - lse_b) / r.clamp_min(torch.finfo(r.dtype).tiny)
        coef_current = torch.exp(m - lse_b)
        block_coef = torch.where(self.earlier, coef_earlier, torch.where(self.current, coef_current, zero))
        self.block_coef, self.r = block_coef, r
        self.weights = e.mul_(block_coef.unsqueeze(-1))  # A, (B, Hkv, G, rows, nb, bs)
        self.lse = lse


def blockwise_forward(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Forward pass. Shapes as in ``landmark_attention``.

    Returns:
        out: (batch, heads, q_len, head_dim) in the input dtype.
        lse: (batch, heads, q_len) log-sum-exp of each query's softmax group, in the compute dtype.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = _compute_dtype(q.dtype)
    qg, kp, vp = _prepare(q, k, v, block_size, dtype)  # (B,Hkv,G,Tq,D), (B,Hkv,Tkp,D) x2
    out = torch.empty(batch, kv_heads, group, q_len, head_dim, dtype=dtype, device=q.device)
    lse = torch.empty(batch, kv_heads, group, q_len, dtype=dtype, device=q.device)
    offset = k_len - q_len
    for r0, r1 in _tiles(q_len, k_len, block_size, BLOCKWISE_TILE_SCORES):
        row_pos = torch.arange(offset + r0, offset + r1, device=q.device)
        tile = _Tile(qg[:, :, :, r0:r1], kp, row_pos, block_size, scale, None)
        a = tile.weights.view(batch, kv_heads, group * (r1 - r0), tile.keys)
        o = torch.matmul(a, vp[:, :, : tile.keys])  # (B, Hkv, G*rows, D)
        out[:, :, :, r0:r1] = o.view(batch, kv_heads, group, r1 - r0, head_dim)
        lse[:, :, :, r0:r1] = tile.lse
    out = out.view(batch, heads, q_len, head_dim).to(q.dtype)
    return out, lse.view(batch, heads, q_len)


def blockwise_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward pass by recomputation. ``lse`` is the forward's second output.

    Returns (dq, dk, dv) with the shapes and dtypes of (q, k, v).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bs = block_size
    dtype = _compute_dtype(q.dtype)
    qg, kp, vp = _prepare(q, k, v, block_size, dtype)
    dog = grad_out.to(dtype).reshape(batch, kv_heads, group, q_len, head_dim)
    lse = lse.to(dtype).reshape(batch, kv_heads, group, q_len)
    dq = torch.empty_like(qg)
    dk = torch.zeros_like(kp)
    dv = torch.zeros_like(vp)
    offset = k_len - q_len
    for r0, r1 in _tiles(q_len, k_len, block_size, BLOCKWISE_TILE_SCORES):
        rows = r1 - r0
        row_pos = torch.arange(offset + r0, offset + r1, device=q.device)
        tile = _Tile(qg[:, :, :, r0:r1], kp, row_pos, block_size, scale, lse[..., r0:r1])
        keys = tile.keys
        a = tile.weights  # (B, Hkv, G, rows, nb, bs)
        do_t = dog[:, :, :, r0:r1].reshape(batch, kv_heads, group * rows, head_dim)
        da = torch.matmul(do_t, vp[:, :, :keys].transpose(-1, -2))  # (B, Hkv, G*rows, keys)
        da = da.view_as(a)
        w = (a * da).sum(dim=-1)  # (B, Hkv, G, rows, nb)
        d_row = w.sum(dim=-1, keepdim=True)  # D_i = dO_i . out_i, (B, Hkv, G, rows, 1)
        p_block = tile.block_coef * tile.r  # weight of each block (the landmark's group probability)
        u = torch.where(
            tile.earlier, w / p_block.clamp_min(torch.finfo(dtype).tiny), d_row.expand_as(w)
        )  # (B, Hkv, G, rows, nb)
        ds = da.sub_(u.unsqueeze(-1)).mul_(a)  # ds for regular tokens; 0 on landmark columns
        zero = torch.zeros((), dtype=dtype, device=q.device)
        ds[..., bs - 1] = torch.where(tile.earlier, w - p_block * d_row, zero)
        ds2 = ds.view(batch, kv_heads, group * rows, keys)
        a2 = a.view(batch, kv_heads, group * rows, keys)
        q2 = qg[:, :, :, r0:r1].reshape(batch, kv_heads, group * rows, head_dim)
        dq[:, :, :, r0:r1] = torch.matmul(ds2, kp[:, :, :keys]).view(batch, kv_heads, group, rows, head_dim)
        dk[:, :, :keys] += torch.matmul(ds2.transpose(-1, -2), q2)
        dv[:, :, :keys] += torch.matmul(a2.transpose(-1, -2), do_t)
    dq = dq.mul_(scale).view(batch, heads, q_len, head_dim).to(q.dtype)
    dk = dk[:, :, :k_len].mul_(scale).to(k.dtype)
    dv = dv[:, :, :k_len].to(v.dtype)
    return dq, dk, dv


def _prepare(q: Tensor, k: Tensor, v: Tensor, block_size: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Cast to the compute dtype, group query heads by kv head, pad keys to whole blocks.

    Returns q (B, Hkv, G, Tq, D) and k, v (B, Hkv, Tk_padded, D).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    pad = math.ceil(k_len / block_size) * block_size - k_len
    qg = q.to(dtype).reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    kp = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, pad))
    vp = torch.nn.functional.pad(v.to(dtype), (0, 0, 0, pad))
    return qg, kp, vp
