"""Reference landmark attention: dense, short, obviously correct. The specification.

This materialises the full (q_len x k_len) score matrix, so its memory is O(len^2). Every other
implementation is tested against it. The semantics are those of docs/method.md:

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


def grouped_softmax(scores: Tensor, current: Tensor, earlier: Tensor) -> Tensor:
    """The grouped softmax over keys laid out as blocks: the one definition every path shares.

    Args:
        scores: (..., n_blocks, block_size) scores of each query against each key, a block's landmark
            at index ``block_size - 1``.
        current: (..., n_blocks, block_size) bool, broadcastable: the regular tokens of the query's own
            block that it can see. They join the softmax group directly.
        earlier: (..., n_blocks) bool, broadcastable: the blocks reached through their landmark. The
            landmark's score joins the group; the weight it wins is split among the block's regular
            tokens by a softmax inside the block.

    Returns:
        (..., n_blocks, block_size) weights; each row sums to 1 over all blocks (0 if the group is
        empty); landmark columns are 0.
    """
    block_size = scores.shape[-1]
    is_landmark = torch.arange(block_size, device=scores.device) == block_size - 1
    earlier = earlier.unsqueeze(-1)  # (..., n_blocks, 1)
    members = earlier & ~is_landmark  # regular tokens of earlier blocks
    group = (current & ~is_landmark) | (earlier & is_landmark)
    # Masked entries get the most negative finite value rather than -inf, so that a row with nothing
    # visible is uniform, not NaN; such a row is then multiplied by zero.
    hidden = torch.finfo(scores.dtype).min
    flat = scores.masked_fill(~group, hidden).flatten(-2)  # (..., n_blocks * block_size)
    p_group = torch.softmax(flat, dim=-1).view_as(scores)
    p_group = p_group * group.flatten(-2).any(-1)[..., None, None]  # an empty group gets zero weights
    in_block = torch.softmax(scores.masked_fill(~members, hidden), dim=-1)  # softmax inside every block
    from_landmarks = in_block * p_group[..., -1:] * members  # the landmark's share, split over its block
    return torch.where(current & ~is_landmark, p_group, from_landmarks)


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
    q_block = q_pos // block_size  # (Tq, 1)
    current = (k_pos // block_size == q_block) & (k_pos <= q_pos)  # own block, visible: (Tq, keys)
    earlier = torch.arange(n_blocks, device=q.device)[None, :] < q_block  # (Tq, n_blocks)
    weights = grouped_softmax(
        scores.view(batch, heads, q_len, n_blocks, block_size),
        current.view(q_len, n_blocks, block_size),
        earlier,
    )
    return weights.view(batch, heads, q_len, keys)[..., :k_len]


def landmark_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float | None = None, *, upcast: bool = True
) -> Tensor:
    """Dense landmark attention: ``landmark_weights(q, k) @ v``. Shapes as in ``landmark_attention``.

    Returns (batch, heads, q_len, head_dim) in the input dtype. Differentiable through autograd.
    """
    weights = landmark_weights(q, k, block_size, scale, upcast=upcast)  # (B, H, Tq, Tk)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).to(weights.dtype)  # (B, H, Tk, D)
    return (weights @ v).to(q.dtype)
