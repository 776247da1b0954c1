"""The public landmark attention function: input checks, dispatch, autograd and torch.library ops.

``landmark_attention`` is the one entry point. It validates its inputs, picks an implementation
(``reference``, ``blockwise`` or ``triton``) and runs it. The two optimised implementations are
registered as ``torch.library`` custom ops with a fake (meta) implementation and an autograd formula,
so they compose with ``torch.compile`` and with autograd:

* ``landmark::blockwise_forward`` / ``landmark::blockwise_backward``
* ``landmark::triton_forward`` / ``landmark::triton_backward``

Both forwards return ``(out, lse)``, ``lse`` being the log-sum-exp of each query's softmax group.
Both backwards recompute what they need from (q, k, v) tile by tile; the Triton backward also reads
``out`` and ``lse``.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from landmark.config import IMPLEMENTATIONS
from landmark.ops.blockwise import blockwise_backward, blockwise_forward
from landmark.ops.reference import landmark_attention_reference
from landmark.ops.support import triton_unsupported_reason

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MAX_SCALE = 1e6  # the largest score scale taken (1 / sqrt(head_dim) is the usual one; 1e308 gave NaN)
_SHAPES = {
    "q": "(batch, heads, q_len, head_dim)",
    "k": "(batch, kv_heads, k_len, head_dim)",
    "v": "(batch, kv_heads, k_len, head_dim)",
}


def landmark_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Landmark attention (the training-time grouped softmax of Mohtashami & Jaggi, 2023).

    Args:
        q: (batch, heads, q_len, head_dim) queries, RoPE already applied.
        k: (batch, kv_heads, k_len, head_dim) keys; ``kv_heads`` divides ``heads`` and query head ``h``
            uses kv head ``h // (heads // kv_heads)`` (grouped-query attention).
        v: (batch, kv_heads, k_len, head_dim) values.
        block_size: positions per block, landmark included: key position ``p`` is a landmark iff
            ``p % block_size == block_size - 1`` (64 = 63 tokens + 1 landmark; the paper's 50 + 1 is 51).
            The last block may be partial.
        scale: score scale, a positive finite number at most ``MAX_SCALE`` (1e6; a larger one overflows
            the scores into NaN outputs); default ``1 / sqrt(head_dim)``.
        impl: ``"auto"`` (Triton on CUDA when the shape is supported, else blockwise), ``"reference"``
            (dense, O(len^2) memory), ``"blockwise"`` (exact, O(len x block) memory) or ``"triton"``.

    The queries are the LAST ``q_len`` positions of the key sequence (``k_len >= q_len``), and the
    attention is causal. With k_len = 8, q_len = 3, block_size = 4 (``L`` = landmark, ``x`` = a
    weight of the softmax group, ``b`` = a share of an earlier landmark's weight, ``.`` = nothing)::

        key position   0 1 2 3 4 5 6 7
        block          0 0 0 0 1 1 1 1
                             L       L
        query at 5     b b b x x x . .     block 0 through its landmark; own block up to itself
        query at 6     b b b x x x x .
        query at 7     b b b x x x x .     a landmark query never attends to itself

    Returns:
        (batch, heads, q_len, head_dim) in the input dtype (float64, float32, bfloat16 or float16;
        half types are accumulated in float32). Differentiable in q, k and v.

    Raises:
        TypeError: non-tensor or non-floating inputs, mixed dtypes, a non-integer ``block_size``, a
            ``scale`` that is not a number (a bool included).
        ValueError: wrong ranks or mismatched shapes, ``kv_heads`` not dividing ``heads``,
            ``q_len > k_len``, ``block_size < 2``, a ``scale`` not in (0, 1e6], mixed devices, an unknown
            or unusable ``impl``.

    The checks read shapes, dtypes and devices only, never the data: meta and fake tensors (torch.compile
    tracing, ``FakeTensorMode``) give an output of the right shape.
    """
    check_inputs(q, k, v, block_size, scale)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLEMENTATIONS))}; got {impl!r}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    # a block longer than the keys holds no landmark among them: the same attention as blocks of
    # k_len + 1 (whose sizes the implementations allocate by)
    block_size = min(block_size, k.shape[2] + 1)
    if impl == "auto":  # the interpreter (TRITON_INTERPRET=1) is for tests: auto never picks it on a CPU
        impl = "triton" if q.is_cuda and triton_unsupported_reason(q, block_size) is None else "blockwise"
    if impl == "reference":
        return landmark_attention_reference(q, k, v, block_size, scale)
    if impl == "triton":
        reason = triton_unsupported_reason(q, block_size)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run here: {reason}")
        return torch.ops.landmark.triton_forward(q, k, v, block_size, scale)[0]
    return torch.ops.landmark.blockwise_forward(q, k, v, block_size, scale)[0]


def check_inputs(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float | None = None) -> None:
    """Raise a TypeError or ValueError naming the argument if the inputs do not fit the contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {_SHAPES[name]}; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating-point tensor (float64, float32, bfloat16 or float16); "
                f"got dtype {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape {_SHAPES[name]}; got {t.dim()} dims {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}); got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}); got {t.device}")
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    expected = f"({batch}, kv_heads, k_len, {head_dim})"
    if k.shape[0] != batch:  # (k against q first: v is then checked against a k known to fit)
        raise ValueError(f"k must have the batch size of q: expected {expected}; got {tuple(k.shape)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k must have the head_dim of q: expected {expected}; got {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"v must have the shape of k {_SHAPES['k']} = {tuple(k.shape)}; got {tuple(v.shape)}"
        )
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"k has {kv_heads} kv_heads, which must divide the {heads} heads of q (grouped-query attention)"
        )
    if q_len < 1 or head_dim < 1 or batch < 1:
        raise ValueError(f"q must have batch, q_len and head_dim >= 1; got shape {tuple(q.shape)}")
    if q_len > k_len:
        raise ValueError(
            f"q_len ({q_len}) must be <= k_len ({k_len}): the queries are the last q_len key positions"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"block_size must be an int (positions per block, landmark included); got {block_size!r}"
        )
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (at least one token plus the landmark); got {block_size}")
    if scale is None:
        return
    bound = f"scale must be a positive finite number at most {MAX_SCALE:g} or None"
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{bound}; got {scale!r}")
    if not 0 < scale <= MAX_SCALE:  # (NaN compares False; a huge int never becomes a float here)
        raise ValueError(f"{bound} (larger scales overflow the scores); got {scale!r}")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- torch.library registration -------------------------------------------------------------------


@torch.library.custom_op("landmark::blockwise_forward", mutates_args=())
def _blockwise_forward_op(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor]:
    return blockwise_forward(q, k, v, block_size, scale)


@torch.library.custom_op("landmark::blockwise_backward", mutates_args=())
def _blockwise_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return blockwise_backward(grad_out, q, k, v, block_size, scale)


def _kernels() -> Any:
    """:mod:`landmark.ops.triton`, imported on first use: it imports triton, an optional dependency."""
    from landmark.ops import triton as kernels

    return kernels


@torch.library.custom_op("landmark::triton_forward", mutates_args=())
def _triton_forward_op(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor]:
    return _kernels().triton_forward(q, k, v, block_size, scale)


@torch.library.custom_op("landmark::triton_backward", mutates_args=())
def _triton_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().triton_backward(grad_out, q, k, v, out, lse, block_size, scale)


def _fake_forward(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _fake_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, *rest) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_blockwise_forward_op.register_fake(_fake_forward)
_triton_forward_op.register_fake(_fake_forward)
_blockwise_backward_op.register_fake(_fake_backward)
_triton_backward_op.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.block_size, ctx.scale = block_size, scale
    ctx.mark_non_differentiable(lse)


def _blockwise_autograd(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, _out, _lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.landmark.blockwise_backward(grad_out, q, k, v, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None


def _triton_autograd(ctx, grad_out: Tensor, _grad_lse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.landmark.triton_backward(grad_out, q, k, v, out, lse, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None


_blockwise_forward_op.register_autograd(_blockwise_autograd, setup_context=_setup_context)
_triton_forward_op.register_autograd(_triton_autograd, setup_context=_setup_context)
