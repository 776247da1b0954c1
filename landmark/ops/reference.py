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


def _safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim where a row of all ``-inf`` gives zeros instead of NaN."""
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


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
    if scale is None:
        scale = head_dim**-0.5
    dtype = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, Tk, D)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # (B, H, Tq, Tk)

    dev = q.device
    q_pos = torch.arange(k_len - q_len, k_len, device=dev)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=dev)[None, :]  # (1, Tk)
    q_block, k_block = q_pos // block_size, k_pos // block_size
    k_is_landmark = k_pos % block_size == block_size - 1
    current = (k_block == q_block) & (k_pos <= q_pos) & ~k_is_landmark  # own block, visible
    earlier = k_block < q_block  # every position of an earlier (hence complete) block
    group = current | (earlier & k_is_landmark)  # the one softmax group
    members = earlier & ~k_is_landmark  # regular tokens of earlier blocks

    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
    p_group = _safe_softmax(torch.where(group, scores, neg_inf))  # (B, H, Tq, Tk)

    # In-block softmax of every earlier block, on a padded (n_blocks, block_size) view of the keys.
    n_blocks = -(-k_len // block_size)
    pad = n_blocks * block_size - k_len
    in_block = torch.where(members, scores, neg_inf)
    in_block = torch.nn.functional.pad(in_block, (0, pad), value=float("-inf"))
    in_block = _safe_softmax(in_block.view(batch, heads, q_len, n_blocks, block_size))
    p_landmark = torch.nn.functional.pad(p_group, (0, pad))
    p_landmark = p_landmark.view(batch, heads, q_len, n_blocks, block_size)[..., -1:]  # (..., nb, 1)
    from_blocks = (in_block * p_landmark).view(batch, heads, q_len, n_blocks * block_size)[..., :k_len]

    return torch.where(current, p_group, from_blocks)


def landmark_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float | None = None, *, upcast: bool = True
) -> Tensor:
    """Dense landmark attention: ``landmark_weights(q, k) @ v``. Shapes as in ``landmark_attention``.

    Returns (batch, heads, q_len, head_dim) in the input dtype. Differentiable through autograd.
    """
    weights = landmark_weights(q, k, block_size, scale, upcast=upcast)  # (B, H, Tq, Tk)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).to(weights.dtype)  # (B, H, Tk, D)
    return (weights @ v).to(q.dtype)
