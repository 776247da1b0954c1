"""Which inputs each landmark attention implementation supports: the predicates that the dispatcher
(:mod:`landmark.ops.attention`) and the Triton kernels (:mod:`landmark.ops.triton`) both use, in a leaf
module so that neither imports the other for them."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from landmark.config import TRITON_BLOCK_SIZES, TRITON_FP64_MAX_TILE, TRITON_MAX_HEAD_DIM


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on ``device``: a CUDA device, or any with ``TRITON_INTERPRET=1``
    (the interpreter, set before triton is imported)."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported_reason(q: Tensor, block_size: int) -> str | None:
    """None if the fused Triton kernel can run on these inputs, else a sentence saying why not."""
    if not triton_runs_on("cuda" if q.is_cuda else "cpu"):
        return "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run it on the CPU)"
    if block_size not in TRITON_BLOCK_SIZES:
        return f"block_size must be one of {TRITON_BLOCK_SIZES} for the Triton kernel; got {block_size}"
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return f"head_dim must be <= {TRITON_MAX_HEAD_DIM} for the Triton kernel; got {q.shape[-1]}"
    reason = fp64_tile_reason(q, block_size)
    if reason is not None:
        return reason
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'landmark-attention[gpu]')"
    return None


def padded_head_dim(head_dim: int) -> int:
    """The Triton kernel's head_dim: the next power of two, at least 16 (masked loads pad it)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def fp64_tile_reason(q: Tensor, block_size: int) -> str | None:
    """None unless ``q`` is float64 on a GPU with a (block_size x padded head_dim) tile larger than
    ``TRITON_FP64_MAX_TILE`` (too much shared memory: the compile fails); then why it cannot run."""
    dpad = padded_head_dim(q.shape[-1])
    if q.dtype != torch.float64 or not q.is_cuda or block_size * dpad <= TRITON_FP64_MAX_TILE:
        return None
    return (
        f"float64 tiles of block_size {block_size} x head_dim {dpad} need more GPU shared memory than "
        f"the kernel can use (at most {TRITON_FP64_MAX_TILE} elements in float64): use impl='blockwise'"
    )
