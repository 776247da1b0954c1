"""Exact, memory-efficient landmark attention for the CPU (and any device PyTorch runs on).

The queries are processed in tiles of whole blocks. For a tile we compute its scores against every
visible key, viewed as (rows, key_blocks, block_size), and evaluate the grouped softmax in closed
form with per-(row, block) statistics::

    m_g   = max of the visible regular scores of block g          (in-block max)
    E_ij  = exp(s_ij - m_g),   r_g = sum_j E_ij                    (in-block softmax numerator, sum)
    group logits: s_{i,l_g} for earlier blocks g, m_c + log r_c for the current block c
    LSE_i = logsumexp(group logits)
    A_ij  = E_ij * c_g,  c_g = exp(s_{i,l_g} - LSE_i) / r_g  (earlier)  or  exp(m_c - LSE_i)  (current)

(evaluated relative to the group's maximum, see ``_tile_weights``).

This is the online-softmax ("flash") formulation with tile = block, except that a tile sees all of
its landmark scores at once, so the running maximum is replaced by an exact one.

The backward pass recomputes the tile from (q, k, v) instead of saving any len x len tensor,
including the group statistics (a reduction over the per-block statistics, so nearly free), so the
weights it differentiates are exactly those of the forward.
With ``dA = dO V^T`` and ``w_g = sum_{j in g} A_ij dA_ij`` (so ``D_i = sum_g w_g = dO_i . out_i``)::

    ds_ij      = A_ij (dA_ij - D_i)                 j in the current block
    ds_ij      = A_ij (dA_ij - w_g / P_g)           j a regular token of earlier block g, P_g = c_g r_g
    ds_{i,l_g} = w_g - P_g D_i                      the landmark of earlier block g

Memory is O(len x tile_rows), a tile being ``max(1, BLOCKWISE_TILE_ROWS // block_size)`` blocks of
query rows (``landmark.config``). The two tile-sized buffers are allocated once per call and reused:
fresh large allocations cost page faults as expensive as the arithmetic on a CPU. Half-precision
inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from landmark import config


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for float16/bfloat16, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def query_tiles(q_len: int, k_len: int, block_size: int, tile_rows: int) -> list[tuple[int, int]]:
    """Split the query rows into tiles that end on block boundaries of the key sequence.

    Query row ``r`` sits at key position ``k_len - q_len + r``. A tile spans a whole number of blocks
    (the first and last may be partial): ``max(1, tile_rows // block_size)`` of them.

    Returns:
        [(row_start, row_end), ...] covering ``range(q_len)`` in order.
    """
    offset = k_len - q_len
    span = max(1, tile_rows // block_size) * block_size
    tiles = []
    pos = offset
    while pos < k_len:
        end = min((pos // span + 1) * span, k_len)
        tiles.append((pos - offset, end - offset))
        pos = end
    return tiles


class _Tile:
    """One query tile: its geometry and, after ``weights()``, the attention weights A in ``scores``.

    Shapes: ``rows`` query rows (per query head), ``n_blocks`` key blocks of ``block_size``;
    per-(row, block) tensors are (B*Hkv, G, rows, n_blocks).
    """

    def __init__(self, row_start: int, row_end: int, offset: int, block_size: int, device: torch.device):
        bs = block_size
        self.r0, self.r1, self.rows = row_start, row_end, row_end - row_start
        first_pos, last_pos = offset + row_start, offset + row_end - 1
        self.first_block = first_pos // bs
        self.n_blocks = last_pos // bs + 1
        self.keys = self.n_blocks * bs
        row_pos = torch.arange(first_pos, last_pos + 1, device=device)  # (rows,)
        # Keys from the tile's first block on need a per-row mask: future positions and landmarks.
        k_pos = torch.arange(self.first_block * bs, self.keys, device=device)
        self.hidden = (k_pos[None, :] > row_pos[:, None]) | (k_pos[None, :] % bs == bs - 1)  # (rows, keys')
        q_block = torch.div(row_pos, bs, rounding_mode="floor")[:, None]  # (rows, 1)
        k_block = torch.arange(self.n_blocks, device=device)[None, :]  # (1, n_blocks)
        self.earlier = k_block < q_block  # (rows, n_blocks): blocks reached through their landmark
        self.current = k_block == q_block  # (rows, n_blocks): the query's own block


def _tile_weights(s: Tensor, tile: _Tile, block_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Turn raw scores into landmark attention weights, in place.

    Args:
        s: (BH, G, rows, n_blocks, block_size) scaled scores q k^T; overwritten with the weights A.

    Returns:
        (A, lse, block_coef, r): A is ``s``; lse is (BH, G, rows); block_coef and r are
        (BH, G, rows, n_blocks) with ``A = E * block_coef`` and ``r`` the in-block sums of E, so a
        block's total weight is their product.

    The group softmax is evaluated relative to its maximum ``g`` (never through an absolute LSE, which
    for scores in the thousands would cost an fp32 ulp of ~1e-4 relative on every weight)::

        term_g = exp(s_{l_g} - g) (earlier)   or   r_c exp(m_c - g) (current);   Z = sum_g term_g
        block_coef_g = term_g / (Z r_g),       lse = g + log Z
    """
    bs = block_size
    landmark_scores = s[..., bs - 1].clone()  # (BH, G, rows, n_blocks)
    # Blocks before the tile are fully visible: only their landmark column leaves the in-block softmax.
    s[..., : tile.first_block, bs - 1] = float("-inf")
    flat = s.view(*s.shape[:-2], tile.keys)
    flat[..., tile.first_block * bs :].masked_fill_(tile.hidden, float("-inf"))

    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    neg_inf = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    m = s.amax(dim=-1)  # in-block max, -inf for a block with nothing visible
    m = torch.where(torch.isfinite(m), m, zero)
    e = s.sub_(m.unsqueeze(-1)).exp_()  # E
    r = e.sum(dim=-1)

    in_group = tile.earlier | (tile.current & (r > 0))  # (rows, n_blocks) broadcast over (BH, G)
    group_logit = torch.where(tile.earlier, landmark_scores, torch.where(in_group, m, neg_inf))
    g = group_logit.amax(dim=-1, keepdim=True)
    g = torch.where(torch.isfinite(g), g, zero)  # a row with an empty group gets zero weights
    term = torch.exp(group_logit - g)  # 0 outside the group
    term = torch.where(tile.earlier, term, term * r)
    z = term.sum(dim=-1, keepdim=True)  # (BH, G, rows, 1)
    block_coef = term / (z * r).clamp_min(torch.finfo(r.dtype).tiny)
    lse = (g + torch.log(z)).squeeze(-1)
    return e.mul_(block_coef.unsqueeze(-1)), lse, block_coef, r


def _scores(qg: Tensor, kp: Tensor, tile: _Tile, buf: Tensor, block_size: int) -> Tensor:
    """(BH, G, rows, n_blocks, block_size) scores of a tile (``qg`` is pre-scaled), written into ``buf``."""
    bh, group, _, head_dim = qg.shape
    q2 = qg[:, :, tile.r0 : tile.r1].reshape(bh, group * tile.rows, head_dim)
    s = buf[: bh * group * tile.rows * tile.keys].view(bh, group * tile.rows, tile.keys)
    torch.bmm(q2, kp[:, : tile.keys].transpose(1, 2), out=s)
    return s.view(bh, group, tile.rows, tile.n_blocks, block_size)


def _prepare(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Cast to the compute dtype, group query heads by kv head, pad keys to whole blocks; scale q once
    (cheaper than scaling every tile of scores).

    Returns q * scale (B*Hkv, G, Tq, D) and k, v (B*Hkv, Tk_padded, D), all contiguous.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    pad = math.ceil(k_len / block_size) * block_size - k_len
    qg = q.to(dtype).reshape(batch * kv_heads, heads // kv_heads, q_len, head_dim) * scale
    kp = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, pad)).reshape(batch * kv_heads, -1, head_dim)
    vp = torch.nn.functional.pad(v.to(dtype), (0, 0, 0, pad)).reshape(batch * kv_heads, -1, head_dim)
    return qg, kp.contiguous(), vp.contiguous()


def _plan(q: Tensor, k: Tensor, block_size: int) -> tuple[list[_Tile], int]:
    """The query tiles and the size of a tile's score buffer."""
    q_len, k_len = q.shape[2], k.shape[2]
    offset = k_len - q_len
    tiles = [
        _Tile(r0, r1, offset, block_size, q.device)
        for r0, r1 in query_tiles(q_len, k_len, block_size, config.BLOCKWISE_TILE_ROWS)
    ]
    return tiles, q.shape[0] * q.shape[1] * max(t.rows * t.keys for t in tiles)


def blockwise_forward(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Forward pass. Shapes as in ``landmark_attention``.

    Returns:
        out: (batch, heads, q_len, head_dim) in the input dtype.
        lse: (batch, heads, q_len), log-sum-exp of each query's softmax group, float32 (float64 for
            float64 inputs).
    """
    batch, heads, q_len, head_dim = q.shape
    qg, kp, vp = _prepare(q, k, v, block_size, scale)  # (BH, G, Tq, D), (BH, Tkp, D) x2
    bh, group = qg.shape[:2]
    tiles, work = _plan(q, k, block_size)
    buf = torch.empty(work, dtype=qg.dtype, device=q.device)
    out = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:3], dtype=qg.dtype, device=q.device)
    for tile in tiles:
        rows = slice(tile.r0, tile.r1)
        s = _scores(qg, kp, tile, buf, block_size)
        a, lse[:, :, rows], _, _ = _tile_weights(s, tile, block_size)
        a2 = a.view(bh, group * tile.rows, tile.keys)
        out[:, :, rows] = torch.bmm(a2, vp[:, : tile.keys]).view(bh, group, tile.rows, head_dim)
    return out.view(batch, heads, q_len, head_dim).to(q.dtype), lse.view(batch, heads, q_len)


def blockwise_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward pass by recomputation.

    Returns (dq, dk, dv) with the shapes and dtypes of (q, k, v).
    """
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    bs = block_size
    qg, kp, vp = _prepare(q, k, v, block_size, scale)
    bh, group = qg.shape[:2]
    dtype = qg.dtype
    dog = grad_out.to(dtype).reshape(bh, group, q_len, head_dim)
    tiles, work = _plan(q, k, block_size)
    buf_s = torch.empty(work, dtype=dtype, device=q.device)
    buf_ds = torch.empty(work, dtype=dtype, device=q.device)
    dq = torch.empty_like(qg)
    dk = torch.zeros_like(kp)
    dv = torch.zeros_like(vp)
    tiny = torch.finfo(dtype).tiny
    zero = torch.zeros((), dtype=dtype, device=q.device)
    for tile in tiles:
        rows, keys, n = slice(tile.r0, tile.r1), tile.keys, tile.rows
        s = _scores(qg, kp, tile, buf_s, block_size)
        a, _, block_coef, r = _tile_weights(s, tile, block_size)
        do2 = dog[:, :, rows].reshape(bh, group * n, head_dim)
        ds = buf_ds[: a.numel()].view(bh, group * n, keys)
        torch.bmm(do2, vp[:, :keys].transpose(1, 2), out=ds)  # dA
        ds = ds.view_as(a).mul_(a)  # A * dA
        w = ds.sum(dim=-1)  # (BH, G, rows, n_blocks)
        d_row = w.sum(dim=-1, keepdim=True)  # D_i = dO_i . out_i
        p_block = block_coef * r  # total weight of each block
        u = torch.where(tile.earlier, w / p_block.clamp_min(tiny), d_row)
        ds.addcmul_(a, u.unsqueeze(-1), value=-1)  # A (dA - u); 0 on landmark columns
        ds[..., bs - 1] = torch.where(tile.earlier, w - p_block * d_row, zero)
        ds2, a2 = ds.view(bh, group * n, keys), a.view(bh, group * n, keys)
        q2 = qg[:, :, rows].reshape(bh, group * n, head_dim)
        dq[:, :, rows] = torch.bmm(ds2, kp[:, :keys]).view(bh, group, n, head_dim)
        dk[:, :keys].baddbmm_(ds2.transpose(1, 2), q2)
        dv[:, :keys].baddbmm_(a2.transpose(1, 2), do2)
    dq = dq.mul_(scale).view(batch, heads, q_len, head_dim).to(q.dtype)
    dk = dk.view(k.shape[0], k.shape[1], -1, head_dim)[:, :, :k_len].to(k.dtype)  # q was pre-scaled
    dv = dv.view(k.shape[0], k.shape[1], -1, head_dim)[:, :, :k_len].to(v.dtype)
    return dq, dk, dv
