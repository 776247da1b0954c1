"""The retrieval step's attention as one Triton kernel: the selected blocks read where they are stored.

``landmark.inference.graph`` selects each (query row, head)'s k blocks with a fixed sequence of tensor
operations; the reference then gathers the selected blocks into a new tensor (``gather_blocks``) and
attends (``retrieval._decode_attend``): on a GPU that copy is ``rows x heads x k`` blocks per layer and
chunk, written once and read once. ``attend_selected`` does the attention instead in one kernel launch,
one program per (batch row, head, query row), which reads each selected block from the block memory
(the ring buffer's physical slot computed in the kernel; int8 blocks times their scales as they are
loaded) and the local context's scores and values, and runs the grouped softmax (docs/method.md) as an
online softmax, exactly as the training op's forward kernel (``landmark.ops.triton``) does:

* a selected block and an earlier local block join the group with ONE logit, the landmark's score
  (``s_l``), and contribute their in-block softmax's average value ``o``::

      M' = max(M, s_l),  Z = Z e^{M - M'} + e^{s_l - M'},  acc = acc e^{M - M'} + e^{s_l - M'} o

* the visible regular tokens of the query's own block join it directly;
* ``out = acc / Z`` (0 for a row with nothing visible: a padding row).

The selected block at rank ``i`` is attended at the query rotated to slot ``i``, or ``i + 1`` for the
most recent blocks (``_decode_attend``'s rule), so the query copies come rotated from ``_decode_local``
and the kernel only picks one. Float16/bfloat16/float32 are computed in float32, float64 in float64.
Without a GPU the kernel runs on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``
before triton is imported), which is how tests/test_triton_retrieval.py checks it against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from landmark.inference.memory import BlockStore
from landmark.inference.step import Selection
from landmark.ops.support import triton_runs_on


@triton.jit
def _attend_kernel(
    q_ptr, sel_ptr, valid_ptr, recent_ptr, start_ptr, keys_ptr, values_ptr, kscale_ptr, vscale_ptr,
    ls_ptr, lv_ptr, cur_ptr, ear_ptr, out_ptr,
    H, C, K, S, NB, CAPACITY, GROUP,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_BS: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (b, h, c) flattened
    c = pid % C
    h = (pid // C) % H
    b = pid // (C * H)
    kv = b * (H // GROUP) + h // GROUP  # (batch row, kv head) flattened
    offs_t = tl.arange(0, BLOCK_BS)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < BS
    regular = offs_t < BS - 1
    is_landmark = offs_t == BS - 1
    d_ok = offs_d < D
    recent = tl.load(recent_ptr + b)
    start = tl.load(start_ptr + b)
    m = tl.full((), -1.0e30, ACC)  # (finite: no inf - inf where a masked update is computed anyway)
    z = tl.zeros((), ACC)
    acc = tl.zeros((BLOCK_D,), ACC)
    for i in range(0, K):
        logical = tl.load(sel_ptr + pid * K + i)
        ok = tl.load(valid_ptr + (b * C + c) * K + i) != 0
        slot = i + (logical >= recent).to(tl.int32)
        phys = (logical + start) % CAPACITY
        phys = tl.where(ok, phys, 0)  # (an invalid rank may hold any index: read slot 0, unused)
        q = tl.load(q_ptr + (pid * S + slot) * D + offs_d, mask=d_ok, other=0.0).to(ACC)
        at = kv * CAPACITY + phys  # the block's (batch row, kv head, slot)
        kt = tl.load(
            keys_ptr + at * D * BS + offs_d[:, None] * BS + offs_t[None, :],
            mask=d_ok[:, None] & t_ok[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_D, BLOCK_BS): key-major, as stored
        v = tl.load(
            values_ptr + at * (BS - 1) * D + offs_t[:, None] * D + offs_d[None, :],
            mask=regular[:, None] & d_ok[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_BS, BLOCK_D): the regular tokens' values
        if QUANT:
            kt = kt * tl.load(kscale_ptr + at).to(ACC)
            v = v * tl.load(vscale_ptr + at).to(ACC)
        s = tl.sum(q[:, None] * kt, axis=0)  # (BLOCK_BS,) scores against the block
        m, z, acc = _join_block(s, v, ok, m, z, acc, regular, is_landmark)
    for j in range(0, NB):
        s = tl.load(ls_ptr + (pid * NB + j) * BS + offs_t, mask=t_ok, other=0.0).to(ACC)
        v = tl.load(
            lv_ptr + (kv * NB * BS + j * BS + offs_t[:, None]) * D + offs_d[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(ACC)
        earlier = tl.load(ear_ptr + (b * C + c) * NB + j) != 0
        m, z, acc = _join_block(s, v, earlier, m, z, acc, regular, is_landmark)
        current = tl.load(cur_ptr + ((b * C + c) * NB + j) * BS + offs_t, mask=t_ok, other=0) != 0
        m, z, acc = _join_tokens(s, v, current & regular, m, z, acc)
    out = tl.where(z > 0, acc / tl.where(z > 0, z, 1.0), 0.0)
    tl.store(out_ptr + pid * D + offs_d, out, mask=d_ok)


@triton.jit
def _join_block(s, v, ok, m, z, acc, regular, is_landmark):
    """A block reached through its landmark joins the online softmax with one logit (its landmark's
    score) and its in-block softmax's average value; nothing changes where ``ok`` is false."""
    s_lm = tl.sum(tl.where(is_landmark, s, 0.0), axis=0)
    s_reg = tl.where(regular, s, float("-inf"))
    p = tl.where(regular, tl.exp(s_reg - tl.max(s_reg, axis=0)), 0.0)
    o = tl.sum(p[:, None] * v, axis=0) / tl.sum(p, axis=0)
    m_new = tl.where(ok, tl.maximum(m, s_lm), m)
    alpha = tl.where(ok, tl.exp(m - m_new), 1.0)
    beta = tl.where(ok, tl.exp(tl.minimum(s_lm - m_new, 0.0)), 0.0)  # (<= 0 wherever it is used)
    return m_new, z * alpha + beta, acc * alpha + beta * o


@triton.jit
def _join_tokens(s, v, visible, m, z, acc):
    """The ``visible`` tokens join the online softmax directly (nothing changes where none is)."""
    any_visible = tl.sum(visible.to(tl.int32), axis=0) > 0
    m_new = tl.where(any_visible, tl.maximum(m, tl.max(tl.where(visible, s, float("-inf")), axis=0)), m)
    alpha = tl.where(any_visible, tl.exp(m - m_new), 1.0)
    p = tl.where(visible, tl.exp(tl.where(visible, s, m_new) - m_new), 0.0)
    return m_new, z * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)


def attend_selected(
    q_att: Tensor,
    selection: Selection,
    store: BlockStore,
    local: tuple[Tensor, Tensor],
    groups: tuple[Tensor, Tensor],
) -> Tensor:
    """``retrieval._decode_attend`` of the selected blocks where they are stored, in one kernel launch.

    Args:
        q_att: (B, H, C, S, D) scaled queries rotated to the attention slots 0..S-1 (``_decode_local``).
        selection: the selected blocks (:class:`~landmark.inference.step.Selection`).
        store: the block memory's contents (``BlockMemory.blocks``), on ``q_att``'s device.
        local: local_scores (B, H, C, nb, bs) and values lv (B, Hkv, nb * bs, D) (``_decode_local``).
        groups: current (B, 1, C, K + nb, bs) and earlier (B, 1, C, K + nb) (``grouped_softmax``'s
            masks; the kernel reads their local part, the K selections' part is ``selection.valid``).

    Returns:
        (B, H, C, D) outputs in ``q_att``'s dtype (zero on padding rows).
    """
    if not triton_runs_on(q_att.device):
        raise ValueError(
            f'kernel="triton" runs on a CUDA device; the model is on {q_att.device} (TRITON_INTERPRET=1, set '
            'before triton is imported, runs it on the CPU, slowly): use kernel="auto" there'
        )
    batch, heads, rows, slots, dim = q_att.shape
    k_sel = selection.blocks.shape[-1]
    kv_heads, capacity, _, bs = store.keys.shape[1:]
    local_scores, lv = local
    nb = local_scores.shape[3]
    current = groups[0][:, 0, :, k_sel:].to(torch.int8).contiguous()  # (B, C, nb, bs)
    earlier = groups[1][:, 0, :, k_sel:].to(torch.int8).contiguous()  # (B, C, nb)
    start = selection.start if selection.start is not None else torch.zeros(batch, 1, 1, dtype=torch.long)
    acc = tl.float64 if q_att.dtype == torch.float64 else tl.float32
    out = torch.empty(batch, heads, rows, dim, dtype=torch.float64 if acc == tl.float64 else torch.float32,
                      device=q_att.device)  # fmt: skip
    quant = store.key_scale is not None
    scales = (store.key_scale, store.value_scale) if quant else (out, out)  # (unread without int8)
    _attend_kernel[(batch * heads * rows,)](
        q_att.contiguous(), selection.blocks.long().contiguous(),
        selection.valid.to(torch.int8).contiguous(), selection.recent_from.reshape(batch).long().contiguous(),
        start.reshape(batch).to(q_att.device).long().contiguous(), store.keys, store.values, *scales,
        local_scores.contiguous(), lv.contiguous(), current, earlier, out,
        heads, rows, k_sel, slots, nb, capacity, heads // kv_heads,
        BS=bs, D=dim, BLOCK_BS=triton.next_power_of_2(bs), BLOCK_D=triton.next_power_of_2(dim),
        QUANT=quant, ACC=acc,
    )  # fmt: skip
    return out.to(q_att.dtype)
