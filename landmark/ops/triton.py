"""Fused Triton landmark attention: forward and backward kernels, one landmark block per tile.

Shapes (as in ``landmark_attention``):

* ``q``: (batch, heads, q_len, head_dim); query row ``r`` sits at key position ``k_len - q_len + r``.
* ``k``, ``v``: (batch, kv_heads, k_len, head_dim); query head ``h`` uses kv head
  ``h // (heads // kv_heads)`` (grouped-query attention).
* ``out``: (batch, heads, q_len, head_dim) in the input dtype.
* ``lse``: (batch, heads, q_len), the log-sum-exp of each query's softmax group, float32 (float64 for
  float64 inputs), the same quantity ``blockwise_forward`` returns.

Key position ``p`` is a landmark iff ``p % block_size == block_size - 1``; the last block may be partial.
The tile is one block (``BLOCK_M = BLOCK_N = block_size``, a power of two in 16..128); head_dim up to 128
is padded to a power of two >= 16 with masked loads. Query tiles are aligned to key blocks, so a query
tile's rows that lie outside ``[k_len - q_len, k_len)`` are masked padding.

Algorithm (``s_ij = q_i . k_j * scale``; see ``landmark/ops/blockwise.py`` for the derivation).

Forward, one program per (query block c, batch, head), running (max ``M_i``, sum ``Z_i``, ``acc_i``):

* every earlier key block g < c: the in-block softmax over the block's regular columns,
  ``E_ij = exp(s_ij - m_g)``, ``r_g = sum_j E_ij`` (landmark column excluded), and the landmark score
  ``s_{i,l_g}`` (column ``block_size - 1``) joins the online softmax as ONE logit::

      M' = max(M, s_l),  Z = Z e^{M - M'} + e^{s_l - M'},
      acc = acc e^{M - M'} + (e^{s_l - M'} / r_g) E_g @ V_g

* the diagonal block c joins the same online softmax as plain causal attention over its visible regular
  tokens (never the landmark column: a landmark query attends to its block's regular tokens and to
  earlier landmarks, never to itself).
* ``out = acc / Z``, ``lse = M + log Z``.

Backward, with ``dA = dO V^T`` and ``lse_i = M_i + log Z_i`` (the group's log-normaliser):

* earlier block g: ``P_i = exp(s_{i,l_g} - lse_i)``, ``A_ij = P_i E_ij / r_g``,
  ``u_i = sum_j (E_ij / r_g) dA_ij``, ``ds_ij = A_ij (dA_ij - u_i)`` for regular j and
  ``ds_{i,l_g} = P_i (u_i - D_i)`` at the landmark column;
* diagonal block: ``A_ij = exp(s_ij - lse_i)``, ``ds_ij = A_ij (dA_ij - D_i)``;
* ``D_i = sum_j A_ij dA_ij = sum_g P_g u_g + sum_{j in diagonal} A_ij dA_ij`` (equal to ``dO_i . out_i``);
* ``dq = scale ds K``, ``dk = scale ds^T Q``, ``dv = A^T dO``.

The dq kernel makes two passes over a query block's key blocks: pass 1 recomputes ``M_i``, ``log Z_i``
(kept apart, not summed into a float32 ``lse``) and ``D_i`` with an online (max, sum) like the forward's,
and stores them for the dk/dv kernel; pass 2 forms ds and dq. Computing ``D`` from the same A and dA that
ds uses (rather than ``dO . out``) and keeping ``log Z`` apart from ``M`` (rather than reading the
forward's rounded ``lse``, whose float32 rounding at |lse| ~ 1000 scales a whole row of A by
1 + O(1e-5)) keeps ``sum_j ds_ij = 0`` to rounding, as autograd's softmax backward does; for saturated
rows (large scores) this is the difference between reference-level q/k gradients and ones with ~100%
relative error. All statistics are tile-local given (M, log Z, D).

``dk``/``dv`` come from one program per (key block, batch, kv head) that loops over the query heads of
its group and over the query blocks at or after it; ``dq`` from one program per (query block, batch,
head) that loops over the key blocks at or before it. No atomics: the backward is deterministic.
Cost per (query block, earlier key block) tile: 2 block matmuls forward, 9 backward (FlashAttention-2:
2 and 5, with atomics for dq), plus the in-block softmax.

Half-precision inputs are accumulated in float32 (the probabilities are rounded to the input dtype before
the ``@ V`` / ``@ dO`` products, as in FlashAttention); float32 uses IEEE (not TF32) dot products;
float64 is computed in float64. Without a GPU, set ``TRITON_INTERPRET=1`` before importing triton to run
these kernels on CPU tensors through the Triton interpreter.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from landmark.ops.support import padded_head_dim, triton_unsupported_reason

__all__ = ["triton_backward", "triton_forward"]


# ---- shared tile helpers ----------------------------------------------------------------------------


@triton.jit
def _dot(a, b, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in ACC. UPCAST multiplies in float32 (exact for bfloat16 products): the Triton
    interpreter's dot treats bfloat16 operands as their uint16 bit patterns."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee").to(ACC)
    else:
        return tl.dot(a, b, input_precision="ieee").to(ACC)


@triton.jit
def _scores(q, k, scale_hi, scale_lo, ACC: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr):
    """s = q k^T * scale in the accumulation dtype. ``scale = scale_hi + scale_lo`` (two float32 halves,
    so that float64 keeps a float64 scale; the low half is only used for float64)."""
    return _mul_scale(_dot(q, tl.trans(k), ACC, UPCAST), scale_hi, scale_lo, FP64)


@triton.jit
def _mul_scale(x, scale_hi, scale_lo, FP64: tl.constexpr):
    """x * scale with ``scale = scale_hi + scale_lo`` (the low half only matters, and is only used, for
    float64)."""
    return x * scale_hi + x * scale_lo if FP64 else x * scale_hi


@triton.jit
def _in_block(s, BLOCK: tl.constexpr):
    """Landmark score and in-block softmax numerator/denominator of an earlier (complete) key block.

    Returns (s_landmark (BLOCK,), E (BLOCK, BLOCK) with a zero landmark column, r (BLOCK,))."""
    is_lm = tl.arange(0, BLOCK) == BLOCK - 1
    s_lm = tl.sum(tl.where(is_lm[None, :], s, 0.0), axis=1)
    s_reg = tl.where(is_lm[None, :], float("-inf"), s)
    m = tl.max(s_reg, axis=1)  # finite: a block has BLOCK - 1 >= 15 regular columns
    e = tl.exp(s_reg - m[:, None])
    r = tl.sum(e, axis=1)  # >= 1
    return s_lm, e, r


@triton.jit
def _diag_visible(qpos, kpos, Tk, BLOCK: tl.constexpr):
    """Visibility inside the diagonal block: causal, a regular token, inside the key sequence."""
    return (kpos[None, :] <= qpos[:, None]) & ((kpos % BLOCK) != BLOCK - 1)[None, :] & (kpos < Tk)[None, :]


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    scale_hi, scale_lo,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    slb, slh, slt,
    H, GROUP, Tq, Tk, D, n_kblocks,
    BLOCK: tl.constexpr, DPAD: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    qb = n_kblocks - 1 - tl.program_id(0)  # the last (heaviest) query blocks first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offset = Tk - Tq

    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    dd = tl.arange(0, DPAD)
    d_ok = dd < D
    qpos = qb * BLOCK + rows
    row_ok = (qpos >= offset) & (qpos < Tk)
    qrow = qpos - offset

    q = tl.load(
        Q + b * sqb + h * sqh + qrow[:, None] * sqt + dd[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK], float("-inf"), ACC)
    z_i = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, DPAD], ACC)

    for g in range(0, qb):
        kpos = g * BLOCK + cols  # an earlier block is complete: kpos < Tk
        k = tl.load(k_base + kpos[:, None] * skt + dd[None, :] * skd, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + kpos[:, None] * svt + dd[None, :] * svd, mask=d_ok[None, :], other=0.0)
        s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
        s_lm, e, r = _in_block(s, BLOCK)
        m_new = tl.maximum(m_i, s_lm)
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(s_lm - m_new)
        z_i = z_i * alpha + w
        p = e * (w / r)[:, None]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, UPCAST)
        m_i = m_new

    # The diagonal block: plain causal softmax over its visible regular tokens, same running group.
    kpos = qb * BLOCK + cols
    k_ok = kpos < Tk
    k = tl.load(
        k_base + kpos[:, None] * skt + dd[None, :] * skd, mask=k_ok[:, None] & d_ok[None, :], other=0.0
    )
    v = tl.load(
        v_base + kpos[:, None] * svt + dd[None, :] * svd, mask=k_ok[:, None] & d_ok[None, :], other=0.0
    )
    s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
    s = tl.where(_diag_visible(qpos, kpos, Tk, BLOCK), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing: keep exp() finite
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    z_i = z_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, UPCAST)

    has = z_i > 0.0
    out = acc / tl.where(has, z_i, 1.0)[:, None]
    lse = tl.where(has, m_new + tl.log(tl.where(has, z_i, 1.0)), float("-inf"))
    tl.store(
        O + b * sob + h * soh + qrow[:, None] * sot + dd[None, :] * sod,
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * slb + h * slh + qrow * slt, lse, mask=row_ok)


# ---- backward ---------------------------------------------------------------------------------------


@triton.jit
def _load_query_tile(
    Q, DO, b, h, qb, offset, Tk, D,
    sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd,
    BLOCK: tl.constexpr, DPAD: tl.constexpr,
):  # fmt: skip
    """q and dO of query block qb (zero on padding rows), with the rows' positions and validity."""
    qpos = qb * BLOCK + tl.arange(0, BLOCK)
    row_ok = (qpos >= offset) & (qpos < Tk)
    qrow = qpos - offset
    dd = tl.arange(0, DPAD)
    mask = row_ok[:, None] & (dd < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + qrow[:, None] * sqt + dd[None, :] * sqd, mask=mask, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + qrow[:, None] * sgt + dd[None, :] * sgd, mask=mask, other=0.0)
    return qpos, row_ok, q, do


@triton.jit
def _load_row_stats(ROW_M, ROW_LZ, ROW_D, b, h, H, Tq, qrow, row_ok):
    """The dq kernel's row statistics; padding rows get lz = +inf, hence A = ds = 0."""
    stat = (b * H + h) * Tq + qrow
    m_i = tl.load(ROW_M + stat, mask=row_ok, other=0.0)
    lz = tl.load(ROW_LZ + stat, mask=row_ok, other=float("inf"))
    delta = tl.load(ROW_D + stat, mask=row_ok, other=0.0)
    return m_i, lz, delta


@triton.jit
def _earlier_stats(s, dA, BLOCK: tl.constexpr):
    """Earlier key block: landmark score, E, r and u = sum_j (E_ij / r) dA_ij."""
    s_lm, e, r = _in_block(s, BLOCK)
    u = tl.sum(e * dA, axis=1) / r
    return s_lm, e, r, u


@triton.jit
def _earlier_grads(s, dA, m, lz, delta, BLOCK: tl.constexpr):
    """A and ds of an earlier key block (landmark column of ds included). The group log-normaliser is
    ``m + lz`` (row max of the group logits, log of the sum relative to it)."""
    s_lm, e, r, u = _earlier_stats(s, dA, BLOCK)
    p_lm = tl.exp((s_lm - m) - lz)  # the landmark's share of the query's softmax group
    a = e * (p_lm / r)[:, None]
    ds = a * (dA - u[:, None])
    is_lm = tl.arange(0, BLOCK) == BLOCK - 1
    ds = tl.where(is_lm[None, :], (p_lm * (u - delta))[:, None], ds)
    return a, ds


@triton.jit
def _diag_grads(s, dA, m, lz, delta, qpos, kpos, Tk, BLOCK: tl.constexpr):
    """A and ds of the diagonal key block."""
    s = tl.where(_diag_visible(qpos, kpos, Tk, BLOCK), s, float("-inf"))
    a = tl.exp((s - m[:, None]) - lz[:, None])
    ds = a * (dA - delta[:, None])
    return a, ds


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, ROW_M, ROW_LZ, ROW_D,
    scale_hi, scale_lo,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sgb, sgh, sgt, sgd,
    sdqb, sdqh, sdqt, sdqd,
    H, GROUP, Tq, Tk, D, n_kblocks,
    BLOCK: tl.constexpr, DPAD: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dq of one query block, and the row statistics the dk/dv kernel needs (ROW_M, ROW_LZ, ROW_D).

    Pass 1 recomputes, with an online (max, sum) like the forward's, the group normaliser as ``M_i`` (the
    max group logit) and ``log Z_i`` (relative to it), and ``D_i = sum_j A_ij dA_ij`` from the same A and
    dA that pass 2 uses. Compared with ``lse`` and ``dO . out`` this keeps sum_j ds_ij = 0 to rounding,
    as autograd's softmax backward does: ``lse`` rounded to float32 at large magnitude (|lse| ~ 1000)
    would scale a row's A by 1 + O(1e-5) and, for saturated rows, give q/k gradients large errors.
    Pass 2 computes ds and dq."""
    qb = n_kblocks - 1 - tl.program_id(0)  # heaviest first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offset = Tk - Tq

    cols = tl.arange(0, BLOCK)
    dd = tl.arange(0, DPAD)
    d_ok = dd < D
    qpos, row_ok, q, do = _load_query_tile(
        Q, DO, b, h, qb, offset, Tk, D, sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, BLOCK, DPAD
    )
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    # Pass 1: M, Z and S = sum_j exp(logit_j - M) dA-weighted, online; D = S / Z.
    kpos_d = qb * BLOCK + cols
    kmask_d = (kpos_d < Tk)[:, None] & d_ok[None, :]
    k = tl.load(k_base + kpos_d[:, None] * skt + dd[None, :] * skd, mask=kmask_d, other=0.0)
    v = tl.load(v_base + kpos_d[:, None] * svt + dd[None, :] * svd, mask=kmask_d, other=0.0)
    s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
    dA = _dot(do, tl.trans(v), ACC, UPCAST)
    s = tl.where(_diag_visible(qpos, kpos_d, Tk, BLOCK), s, float("-inf"))
    m_i = tl.max(s, axis=1)
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    e = tl.exp(s - m_i[:, None])
    z_i = tl.sum(e, axis=1)
    s_i = tl.sum(e * dA, axis=1)
    for g in range(0, qb):
        kpos = g * BLOCK + cols  # an earlier block is complete: kpos < Tk
        k = tl.load(k_base + kpos[:, None] * skt + dd[None, :] * skd, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + kpos[:, None] * svt + dd[None, :] * svd, mask=d_ok[None, :], other=0.0)
        s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
        dA = _dot(do, tl.trans(v), ACC, UPCAST)
        s_lm, _e, _r, u = _earlier_stats(s, dA, BLOCK)
        m_new = tl.maximum(m_i, s_lm)
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(s_lm - m_new)
        z_i = z_i * alpha + w
        s_i = s_i * alpha + w * u
        m_i = m_new
    has = row_ok & (z_i > 0.0)
    delta = tl.where(has, s_i / tl.where(has, z_i, 1.0), 0.0)
    lz = tl.where(has, tl.log(tl.where(has, z_i, 1.0)), float("inf"))  # +inf: padding rows get A = 0
    stat = (b * H + h) * Tq + (qpos - offset)
    tl.store(ROW_M + stat, m_i, mask=row_ok)
    tl.store(ROW_LZ + stat, lz, mask=row_ok)
    tl.store(ROW_D + stat, delta, mask=row_ok)

    # Pass 2: ds and dq.
    dq = tl.zeros([BLOCK, DPAD], ACC)
    for g in range(0, qb):
        kpos = g * BLOCK + cols
        k = tl.load(k_base + kpos[:, None] * skt + dd[None, :] * skd, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + kpos[:, None] * svt + dd[None, :] * svd, mask=d_ok[None, :], other=0.0)
        s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
        dA = _dot(do, tl.trans(v), ACC, UPCAST)
        _a, ds = _earlier_grads(s, dA, m_i, lz, delta, BLOCK)
        dq += _dot(ds.to(k.dtype), k, ACC, UPCAST)
    k = tl.load(k_base + kpos_d[:, None] * skt + dd[None, :] * skd, mask=kmask_d, other=0.0)
    v = tl.load(v_base + kpos_d[:, None] * svt + dd[None, :] * svd, mask=kmask_d, other=0.0)
    s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
    dA = _dot(do, tl.trans(v), ACC, UPCAST)
    _a, ds = _diag_grads(s, dA, m_i, lz, delta, qpos, kpos_d, Tk, BLOCK)
    dq += _dot(ds.to(k.dtype), k, ACC, UPCAST)

    dq = _mul_scale(dq, scale_hi, scale_lo, FP64)
    tl.store(
        DQ + b * sdqb + h * sdqh + (qpos - offset)[:, None] * sdqt + dd[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, ROW_M, ROW_LZ, ROW_D,
    scale_hi, scale_lo,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sgb, sgh, sgt, sgd,
    sdkb, sdkh, sdkt, sdkd,
    sdvb, sdvh, sdvt, sdvd,
    H, HKV, GROUP, Tq, Tk, D, n_kblocks,
    BLOCK: tl.constexpr, DPAD: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key block: over the query heads of its kv group and the query blocks at or after it."""
    g = tl.program_id(0)  # key block 0 has the most work and goes first
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offset = Tk - Tq
    first_qb = offset // BLOCK

    cols = tl.arange(0, BLOCK)
    dd = tl.arange(0, DPAD)
    kpos = g * BLOCK + cols
    kmask = (kpos < Tk)[:, None] & (dd < D)[None, :]
    k = tl.load(K + b * skb + hk * skh + kpos[:, None] * skt + dd[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + kpos[:, None] * svt + dd[None, :] * svd, mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK, DPAD], ACC)
    dv = tl.zeros([BLOCK, DPAD], ACC)

    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        if g >= first_qb:  # the diagonal tile: query block g itself, when it holds queries
            qpos, row_ok, q, do = _load_query_tile(
                Q, DO, b, h, g, offset, Tk, D, sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, BLOCK, DPAD
            )
            m_i, lz, delta = _load_row_stats(ROW_M, ROW_LZ, ROW_D, b, h, H, Tq, qpos - offset, row_ok)
            s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
            dA = _dot(do, tl.trans(v), ACC, UPCAST)
            a, ds = _diag_grads(s, dA, m_i, lz, delta, qpos, kpos, Tk, BLOCK)
            dv += _dot(tl.trans(a).to(do.dtype), do, ACC, UPCAST)
            dk += _dot(tl.trans(ds).to(q.dtype), q, ACC, UPCAST)
        for qb in range(tl.maximum(g + 1, first_qb), n_kblocks):  # query blocks that see g as earlier
            qpos, row_ok, q, do = _load_query_tile(
                Q, DO, b, h, qb, offset, Tk, D, sqb, sqh, sqt, sqd, sgb, sgh, sgt, sgd, BLOCK, DPAD
            )
            m_i, lz, delta = _load_row_stats(ROW_M, ROW_LZ, ROW_D, b, h, H, Tq, qpos - offset, row_ok)
            s = _scores(q, k, scale_hi, scale_lo, ACC, FP64, UPCAST)
            dA = _dot(do, tl.trans(v), ACC, UPCAST)
            a, ds = _earlier_grads(s, dA, m_i, lz, delta, BLOCK)
            dv += _dot(tl.trans(a).to(do.dtype), do, ACC, UPCAST)
            dk += _dot(tl.trans(ds).to(q.dtype), q, ACC, UPCAST)

    dk = _mul_scale(dk, scale_hi, scale_lo, FP64)
    tl.store(
        DK + b * sdkb + hk * sdkh + kpos[:, None] * sdkt + dd[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=kmask,
    )
    tl.store(
        DV + b * sdvb + hk * sdvh + kpos[:, None] * sdvt + dd[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=kmask,
    )


# ---- Python wrappers --------------------------------------------------------------------------------


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q: Tensor, k: Tensor, v: Tensor, block_size: int) -> None:
    reason = triton_unsupported_reason(q, block_size)  # block size, head_dim, float64 tile, device
    if reason is not None:
        raise ValueError(reason)
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share one dtype of {_SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[1] % k.shape[1] != 0 or k.shape != v.shape or q.shape[2] > k.shape[2]:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _split_scale(scale: float) -> tuple[float, float]:
    """scale = hi + lo with hi, lo float32, so that a float32 kernel argument loses nothing for float64."""
    hi = float(np.float32(scale))
    return hi, float(np.float32(scale - hi))


def _interpreting() -> bool:
    """Whether these kernels run through the Triton interpreter (decided when triton decorated them)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_config(block_size: int, dpad: int, backward: bool) -> dict[str, int]:
    """Warps and pipeline stages (untuned guesses: one (block x block) tile of scores per program)."""
    big = block_size * dpad >= 128 * 128
    if backward:  # more live (block x block) tiles: s, dA, A, ds, and two accumulators
        return {"num_warps": 4 if block_size <= 32 else 8, "num_stages": 1 if big else 2}
    return {"num_warps": 4 if block_size <= 64 else 8, "num_stages": 2 if big else 3}


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def triton_forward(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Fused forward pass.

    Args:
        q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim), k_len >= q_len.
        block_size: a power of two in 16..128 (the landmark is the last position of each block).
        scale: score scale.

    Returns:
        out: (batch, heads, q_len, head_dim) in the input dtype.
        lse: (batch, heads, q_len), float32 (float64 for float64 inputs).
    """
    _check(q, k, v, block_size)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    acc_torch, acc_tl = _acc(q.dtype)
    out = torch.empty_like(q)
    lse = q.new_empty((batch, heads, q_len), dtype=acc_torch)
    n_kblocks = triton.cdiv(k_len, block_size)
    n_qblocks = n_kblocks - (k_len - q_len) // block_size
    dpad = padded_head_dim(head_dim)
    hi, lo = _split_scale(scale)
    with _device_guard(q):
        _fwd_kernel[(n_qblocks, batch * heads)](
            q, k, v, out, lse,
            hi, lo,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            heads, heads // kv_heads, q_len, k_len, head_dim, n_kblocks,
            BLOCK=block_size, DPAD=dpad, ACC=acc_tl, FP64=q.dtype == torch.float64,
            UPCAST=_interpreting() and q.dtype == torch.bfloat16,
            **_launch_config(block_size, dpad, backward=False),
        )  # fmt: skip
    return out, lse


def triton_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    block_size: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward pass by recomputation.

    ``out`` and ``lse`` (the forward's outputs) are accepted for the op's interface; the dq kernel
    recomputes the group normaliser and ``D`` itself (see ``_bwd_dq_kernel``), which is more accurate
    than ``lse`` and ``dO . out`` at no extra cost, since it must visit every key block of the row anyway.

    Returns (dq, dk, dv) with the shapes and dtypes of (q, k, v).
    """
    del out, lse
    _check(q, k, v, block_size)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    acc_torch, acc_tl = _acc(q.dtype)
    grad_out = grad_out.to(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    row_m, row_lz, row_d = q.new_empty((3, batch, heads, q_len), dtype=acc_torch).unbind(0)
    n_kblocks = triton.cdiv(k_len, block_size)
    n_qblocks = n_kblocks - (k_len - q_len) // block_size
    dpad = padded_head_dim(head_dim)
    hi, lo = _split_scale(scale)
    consts = {
        "BLOCK": block_size,
        "DPAD": dpad,
        "ACC": acc_tl,
        "FP64": q.dtype == torch.float64,
        "UPCAST": _interpreting() and q.dtype == torch.bfloat16,
        **_launch_config(block_size, dpad, backward=True),
    }
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    with _device_guard(q):
        _bwd_dq_kernel[(n_qblocks, batch * heads)](
            q, k, v, grad_out, dq, row_m, row_lz, row_d,
            hi, lo,
            *strides, *dq.stride(),
            heads, heads // kv_heads, q_len, k_len, head_dim, n_kblocks,
            **consts,
        )  # fmt: skip
        _bwd_dkdv_kernel[(n_kblocks, batch * kv_heads)](
            q, k, v, grad_out, dk, dv, row_m, row_lz, row_d,
            hi, lo,
            *strides, *dk.stride(), *dv.stride(),
            heads, kv_heads, heads // kv_heads, q_len, k_len, head_dim, n_kblocks,
            **consts,
        )  # fmt: skip
    return dq, dk, dv
