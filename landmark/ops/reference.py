"""Reference landmark attention: dense, short, obviously correct. The specification.

This materialises the full (q_len x k_len) score matrix, so its memory is O(len^2). Every other
implementation is tested against it. The semantics are those of shared/method.md section 3:

* a block is ``block_size`` consecutive key positions; the last is the landmark
  (position ``p`` is a landmark iff ``p % block_size == block_size - 1``);
* a query at position ``i`` forms ONE softmax group from the regular tokens of its own block that it
  can see (``j <= i``) and the landmarks of all earlier blocks;
* the weight a landmark receives is handed to its block's regular tokens, split among them by an
  ordinary softmax inside that block; landmarks themselves carry no value weight;
* a landmark query treats its own block as current and never attends to itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def landmark_weights(
    q: Tensor, k: Tensor, block_size: int, scale: float | None = None, *, upcast: bool = True
) -> Tensor:
    """The landmark attention weight matrix.

    Args:
        q: (batch, heads, q_len, head_dim); query row ``r`` sits at key position ``k_len - q_len + r``.
        k: (batch, kv_heads, k_len, head_dim), ``kv_heads`` dividing ``heads``.
        block_size: positions per block, landmark included.
        scale: score scale, default ``1 / sqrt(head_dim)``.
        upcast: compute in float32 for float16/bfloat16 inputs (the library's contract); ``False``
            computes in the input dtype, which tests use as a low-precision baseline.

    Returns:
        (batch, heads, q_len, k_len) weights in the compute dtype; each row sums to 1 and every
        landmark column is 0.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype
    n_blocks = -(-k_len // block_size)
    keys = n_blocks * block_size  # keys padded to whole blocks; the padding is never visible (future)
    k = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, keys - k_len))
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, keys, D)
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * scale  # (B, H, Tq, keys)

    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(keys, device=q.device)[None, :]  # (1, keys)
    q_block, k_block = q_pos // block_size, k_pos // block_size
    k_is_landmark = k_pos % block_size == block_size - 1
    current = (k_block == q_block) & (k_pos <= q_pos) & ~k_is_landmark  # own block, visible
    earlier = k_block < q_block  # every position of an earlier (hence complete) block
    group = current | (earlier & k_is_landmark)  # the one softmax group: never empty
    members = earlier & ~k_is_landmark  # regular tokens of earlier blocks

    # Masked entries get the most negative finite value rather than -inf, so that a row with nothing
    # visible (only ever an in-block row of a block that is not earlier) is uniform, not NaN; such a
    # row is then multiplied by its landmark's group weight, which is 0.
    hidden = torch.finfo(dtype).min
    p_group = torch.softmax(scores.masked_fill(~group, hidden), dim=-1)  # (B, H, Tq, keys)
    in_block = torch.softmax(
        scores.masked_fill(~members, hidden).view(batch, heads, q_len, n_blocks, block_size), dim=-1
    )  # (B, H, Tq, n_blocks, block_size): softmax inside every block
    p_landmark = p_group.view(batch, heads, q_len, n_blocks, block_size)[..., -1:]  # (..., n_blocks, 1)
    from_blocks = (in_block * p_landmark).view(batch, heads, q_len, keys)
    weights = torch.where(current, p_group, from_blocks)
    return weights[..., :k_len]


def landmark_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float | None = None, *, upcast: bool = True
) -> Tensor:
    """Dense landmark attention: ``landmark_weights(q, k) @ v``. Shapes as in ``landmark_attention``.

    Returns (batch, heads, q_len, head_dim) in the input dtype. Differentiable through autograd.
    """
    weights = landmark_weights(q, k, block_size, scale, upcast=upcast)  # (B, H, Tq, Tk)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).to(weights.dtype)  # (B, H, Tk, D)
    return (weights @ v).to(q.dtype)
