"""The fused Triton kernels (landmark/ops/triton.py) against the dense reference.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before triton is imported), so the sizes are small; on a
CUDA machine the same tests run the compiled kernels on CUDA tensors.

Accuracy rules, all against the float64 reference evaluated on the same (rounded) inputs:

* float64: 1e-10 (relative to the magnitude of each tensor);
* float32: rtol = atol = 1e-5;
* bfloat16 / float16: the max error is at most twice that of the reference computed in the same dtype
  (``upcast=False``), plus half a unit in the last place of the largest entry (the rounding of the
  result to the dtype, which no implementation avoids);
* large-magnitude scores (q, k multiplied by 30, scores ~1000): float64 stays at 1e-10 and the half
  types keep their rule; for float32, whose reference error is itself tiny but luck-dependent there,
  the floor becomes the first-order sensitivity to rounding the scores, ``eps * max|s| * max|result|``
  (any implementation that forms the scores in float32 perturbs them by ~``eps |s|``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from landmark.ops.attention import landmark_attention
from landmark.ops.blockwise import blockwise_forward
from landmark.ops.reference import landmark_attention_reference
from landmark.ops.support import fp64_tile_reason, triton_unsupported_reason
from landmark.ops.triton import triton_backward, triton_forward

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = (torch.bfloat16, torch.float16)

# (batch, heads, kv_heads, q_len, k_len, head_dim, block_size)
ALIGNED = (1, 2, 2, 64, 64, 16, 16)
Q_NOT_MULTIPLE = (1, 2, 2, 50, 50, 24, 16)
OFFSET_ALIGNED_GQA = (1, 2, 1, 40, 72, 32, 16)  # k_len - q_len = 32: two whole blocks of context
OFFSET_UNALIGNED_GQA = (1, 4, 2, 37, 90, 24, 32)  # k_len - q_len = 53
BATCH_GQA_MANY_BLOCKS = (2, 4, 2, 70, 100, 24, 16)
SINGLE_QUERY = (2, 2, 1, 1, 45, 8, 16)
HEAD_DIM_8 = (2, 3, 3, 33, 33, 8, 16)
HEAD_DIM_80 = (1, 2, 2, 70, 70, 80, 32)
BLOCK_64 = (1, 1, 1, 100, 200, 64, 64)
BLOCK_128_HEAD_DIM_128 = (1, 1, 1, 130, 130, 128, 128)
LARGE = (1, 2, 1, 50, 70, 24, 16)

ALL_SHAPES = [
    ALIGNED,
    Q_NOT_MULTIPLE,
    OFFSET_ALIGNED_GQA,
    OFFSET_UNALIGNED_GQA,
    BATCH_GQA_MANY_BLOCKS,
    SINGLE_QUERY,
    HEAD_DIM_8,
    HEAD_DIM_80,
    BLOCK_64,
    BLOCK_128_HEAD_DIM_128,
]
FP32_SHAPES = [Q_NOT_MULTIPLE, OFFSET_UNALIGNED_GQA, SINGLE_QUERY, HEAD_DIM_80, BLOCK_64]
LOW_SHAPES = [Q_NOT_MULTIPLE, OFFSET_UNALIGNED_GQA, BLOCK_64]


def shape_id(shape: tuple[int, ...]) -> str:
    return "B{}-H{}-Hkv{}-Tq{}-Tk{}-D{}-bs{}".format(*shape)


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, magnitude: float = 1.0, seed: int = 0):
    """q, k, v, grad_out in ``dtype`` (generated in float64, then rounded)."""
    batch, heads, kv_heads, q_len, k_len, head_dim, _ = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int, mag: float = 1.0) -> torch.Tensor:
        t = torch.randn(*size, generator=gen, dtype=torch.float64) * mag
        return t.to(dtype).to(DEVICE)

    q = randn(batch, heads, q_len, head_dim, mag=magnitude)
    k = randn(batch, kv_heads, k_len, head_dim, mag=magnitude)
    v = randn(batch, kv_heads, k_len, head_dim)
    grad_out = randn(batch, heads, q_len, head_dim)
    return q, k, v, grad_out


def reference_with_grads(q, k, v, grad_out, block_size: int, *, dtype=None, upcast: bool = True):
    """[out, dq, dk, dv] of the dense reference, run in ``dtype`` (default: the inputs' dtype)."""
    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = landmark_attention_reference(*leaves, block_size, upcast=upcast)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def triton_with_grads(q, k, v, grad_out, block_size: int):
    scale = q.shape[-1] ** -0.5
    out, lse = triton_forward(q, k, v, block_size, scale)
    dq, dk, dv = triton_backward(grad_out, q, k, v, out, lse, block_size, scale)
    return [out, dq, dk, dv], lse


def check_dtypes(results, q, k, v) -> None:
    for name, got, like in zip(("out", "dq", "dk", "dv"), results, (q, q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert torch.isfinite(got).all(), f"{name} has non-finite values"


def max_score(q, k) -> float:
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    return float((q.double() @ kk.transpose(-1, -2)).abs().max()) * q.shape[-1] ** -0.5


def check_low_precision(results, q, k, v, grad_out, block_size: int, score_floor: bool = False) -> None:
    """The rule for dtypes below float64: at most twice the error of the same-dtype reference + a floor."""
    dtype = q.dtype
    exact = reference_with_grads(q, k, v, grad_out, block_size, dtype=torch.float64)
    base = reference_with_grads(q, k, v, grad_out, block_size, upcast=False)
    eps = torch.finfo(dtype).eps
    for name, got, ref, low in zip(("out", "dq", "dk", "dv"), results, exact, base):
        err = float((got.double() - ref).abs().max())
        base_err = float((low.double() - ref).abs().max())
        floor = 0.5 * eps * float(ref.abs().max())
        if score_floor:
            floor += eps * max_score(q, k) * float(ref.abs().max())
        assert err <= 2 * base_err + floor, (
            f"{name}: max error {err:.3g} > 2 x {base_err:.3g} (same-dtype reference) + {floor:.3g}"
        )


def assert_all_close(results, expected, rtol: float, atol: float) -> None:
    for name, got, ref in zip(("out", "dq", "dk", "dv"), results, expected):
        torch.testing.assert_close(
            got, ref.to(got.dtype), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


# ---- float64 and float32 against the reference ------------------------------------------------------


@pytest.mark.parametrize("shape", ALL_SHAPES, ids=shape_id)
def test_float64_matches_reference(shape):
    q, k, v, grad_out = make_inputs(shape, torch.float64)
    if fp64_tile_reason(q, shape[-1]) is not None:  # on a GPU: too much shared memory, refused up front
        with pytest.raises(ValueError, match="float64 tiles of block_size 128 x head_dim 128"):
            triton_forward(q, k, v, shape[-1], 1.0)
        return
    results, lse = triton_with_grads(q, k, v, grad_out, shape[-1])
    check_dtypes(results, q, k, v)
    assert lse.dtype == torch.float64
    expected = reference_with_grads(q, k, v, grad_out, shape[-1])
    for got, ref in zip(results, expected):
        assert float((got - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("shape", FP32_SHAPES, ids=shape_id)
def test_float32_matches_reference(shape):
    q, k, v, grad_out = make_inputs(shape, torch.float32)
    results, lse = triton_with_grads(q, k, v, grad_out, shape[-1])
    check_dtypes(results, q, k, v)
    assert lse.dtype == torch.float32
    expected = reference_with_grads(q, k, v, grad_out, shape[-1], dtype=torch.float64)
    assert_all_close(results, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", LOW_SHAPES, ids=shape_id)
def test_half_precision_within_twice_reference_error(shape, dtype):
    q, k, v, grad_out = make_inputs(shape, dtype)
    results, lse = triton_with_grads(q, k, v, grad_out, shape[-1])
    check_dtypes(results, q, k, v)
    assert lse.dtype == torch.float32
    check_low_precision(results, q, k, v, grad_out, shape[-1])


# ---- large-magnitude scores -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW], ids=str)
def test_large_magnitude_scores(dtype):
    q, k, v, grad_out = make_inputs(LARGE, dtype, magnitude=30.0)
    assert max_score(q, k) > 500  # saturated softmaxes, in-block and across the group
    results, _ = triton_with_grads(q, k, v, grad_out, LARGE[-1])
    check_dtypes(results, q, k, v)
    if dtype == torch.float64:
        expected = reference_with_grads(q, k, v, grad_out, LARGE[-1])
        for got, ref in zip(results, expected):
            assert float((got - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))
    else:
        check_low_precision(results, q, k, v, grad_out, LARGE[-1], score_floor=dtype == torch.float32)


# ---- lse, interface, determinism --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [Q_NOT_MULTIPLE, OFFSET_UNALIGNED_GQA, SINGLE_QUERY], ids=shape_id)
def test_lse_matches_blockwise(shape, dtype):
    q, k, v, _ = make_inputs(shape, dtype)
    scale = shape[5] ** -0.5
    _, lse = triton_forward(q, k, v, shape[-1], scale)
    _, lse_b = blockwise_forward(q, k, v, shape[-1], scale)
    assert lse.shape == lse_b.shape == q.shape[:3]
    assert lse.dtype == lse_b.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse, lse_b, rtol=tol, atol=tol)


def test_outputs_written_everywhere(poison_empty):
    """Every element of out, lse, dq, dk, dv is written (torch.empty returns NaN-filled memory here)."""
    q, k, v, grad_out = make_inputs(OFFSET_UNALIGNED_GQA, torch.float32)
    results, lse = triton_with_grads(q, k, v, grad_out, OFFSET_UNALIGNED_GQA[-1])
    check_dtypes(results, q, k, v)
    assert torch.isfinite(lse).all()


def test_backward_is_deterministic():
    q, k, v, grad_out = make_inputs(BATCH_GQA_MANY_BLOCKS, torch.float32)
    first, _ = triton_with_grads(q, k, v, grad_out, BATCH_GQA_MANY_BLOCKS[-1])
    second, _ = triton_with_grads(q, k, v, grad_out, BATCH_GQA_MANY_BLOCKS[-1])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    """(batch, len, heads, dim) storage viewed as (batch, heads, len, dim), as attention layers produce."""
    shape = OFFSET_UNALIGNED_GQA
    q, k, v, grad_out = make_inputs(shape, torch.float32)
    qt, kt, vt, gt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, grad_out))
    assert not qt.is_contiguous()
    results, _ = triton_with_grads(qt, kt, vt, gt, shape[-1])
    expected, _ = triton_with_grads(q, k, v, grad_out, shape[-1])
    assert_all_close(results, expected, rtol=1e-6, atol=1e-6)


def test_unsupported_block_size_raises():
    q, k, v, _ = make_inputs(Q_NOT_MULTIPLE, torch.float32)
    with pytest.raises(ValueError, match="block_size"):
        triton_forward(q, k, v, 48, 0.2)


def test_landmark_attention_impl_triton_autograd():
    """End to end through landmark_attention -> torch.ops.landmark.triton_forward / triton_backward."""
    shape = BATCH_GQA_MANY_BLOCKS
    q, k, v, grad_out = make_inputs(shape, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = landmark_attention(*leaves, shape[-1], impl="triton")
    out.backward(grad_out)
    results = [out.detach()] + [t.grad for t in leaves]
    expected = reference_with_grads(q, k, v, grad_out, shape[-1], dtype=torch.float64)
    assert_all_close(results, expected, rtol=1e-5, atol=1e-5)


def test_expanded_grad_out():
    """out.sum().backward() hands the backward a stride-0 (expanded) grad_out."""
    shape = OFFSET_ALIGNED_GQA
    q, k, v, _ = make_inputs(shape, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    landmark_attention(*leaves, shape[-1], impl="triton").sum().backward()
    ones = torch.ones_like(q)
    expected = reference_with_grads(q, k, v, ones, shape[-1])[1:]
    for got, ref in zip([t.grad for t in leaves], expected):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_custom_op_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the torch.library op."""
    q, k, v, _ = make_inputs((1, 2, 1, 20, 20, 8, 16), torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 16, 8**-0.5)
    torch.library.opcheck(
        torch.ops.landmark.triton_forward.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_float64_tiles_too_large_for_gpu_shared_memory_go_to_blockwise():
    """On a GPU, float64 tiles above TRITON_FP64_MAX_TILE (block 128 x head_dim 128 asked an H200 for 384
    KiB of shared memory) are refused by the kernel and sent to the blockwise path by impl='auto'; other
    dtypes, smaller tiles and the CPU interpreter are unaffected. (A stand-in object plays the CUDA
    tensor: the rule reads dtype, device and shape only.)"""
    from types import SimpleNamespace

    def fake(dtype, head_dim, cuda=True):
        return SimpleNamespace(dtype=dtype, is_cuda=cuda, shape=(1, 2, 3, head_dim))

    reason = fp64_tile_reason(fake(torch.float64, 128), 128)
    assert reason is not None and "impl='blockwise'" in reason
    assert triton_unsupported_reason(fake(torch.float64, 120), 128) == reason  # head_dim padded to 128
    assert fp64_tile_reason(fake(torch.float64, 64), 128) is not None  # 8192 elements
    assert fp64_tile_reason(fake(torch.float64, 64), 64) is None  # ran on the H200
    assert fp64_tile_reason(fake(torch.float64, 8), 128) is None  # head_dim padded to 16
    assert fp64_tile_reason(fake(torch.float32, 128), 128) is None
    assert fp64_tile_reason(fake(torch.bfloat16, 128), 128) is None
    assert fp64_tile_reason(fake(torch.float64, 128, cuda=False), 128) is None
