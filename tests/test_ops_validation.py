"""Bad input to landmark_attention: a TypeError or ValueError that names the argument and the shape."""

from __future__ import annotations

import pytest
import torch

from landmark import landmark_attention


def qkv(batch=1, heads=4, kv_heads=2, q_len=8, k_len=8, head_dim=16, dtype=torch.float32):
    return (
        torch.randn(batch, heads, q_len, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, k_len, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, k_len, head_dim, dtype=dtype),
    )


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have shape \(batch, heads, q_len, head_dim\); got 3 dims"):
        landmark_attention(q[0], k, v, 4)
    with pytest.raises(
        ValueError, match=r"k must have shape \(batch, kv_heads, k_len, head_dim\); got 5 dims"
    ):
        landmark_attention(q, k[None], v, 4)
    with pytest.raises(
        ValueError, match=r"v must have shape \(batch, kv_heads, k_len, head_dim\); got 2 dims"
    ):
        landmark_attention(q, k, v[0, 0], 4)


def test_mismatched_batch():
    q, _, _ = qkv(batch=2)
    _, k, v = qkv(batch=1)
    with pytest.raises(
        ValueError, match=r"k must have the batch size of q: expected \(2, kv_heads, k_len, 16\)"
    ):
        landmark_attention(q, k, v, 4)


def test_mismatched_head_dim():
    q, _, _ = qkv(head_dim=16)
    _, k, v = qkv(head_dim=8)
    with pytest.raises(
        ValueError, match=r"k must have the head_dim of q: expected \(1, kv_heads, k_len, 16\)"
    ):
        landmark_attention(q, k, v, 4)


def test_the_wrong_one_of_k_and_v_is_named():
    """q and v of head_dim 16, k of 8: k is wrong (it was v that the message blamed)."""
    q, _, v = qkv(head_dim=16)
    _, k, _ = qkv(head_dim=8)
    with pytest.raises(ValueError, match=r"k must have the head_dim of q"):
        landmark_attention(q, k, v, 4)


def test_v_shape_differs_from_k():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v must have the shape of k .* got \(1, 2, 7, 16\)"):
        landmark_attention(q, k, v[:, :, :7], 4)


def test_kv_heads_not_dividing_heads():
    q, k, v = qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="k has 3 kv_heads, which must divide the 4 heads of q"):
        landmark_attention(q, k, v, 4)


def test_q_longer_than_k():
    q, k, v = qkv(q_len=9, k_len=8)
    with pytest.raises(ValueError, match=r"q_len \(9\) must be <= k_len \(8\)"):
        landmark_attention(q, k, v, 4)


@pytest.mark.parametrize("block_size", [1, 0, -3])
def test_block_size_too_small(block_size):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=f"block_size must be >= 2 .*got {block_size}"):
        landmark_attention(q, k, v, block_size)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_a_block_longer_than_the_keys_is_one_block_without_landmark(impl):
    """block_size = 10**12 (it tried to allocate 128 TB): the keys hold no landmark, as with blocks of
    k_len + 1; outputs and gradients equal those, and the reference with a block of k_len + 5."""
    q, k, v = (t.double().requires_grad_() for t in qkv())
    huge = landmark_attention(q, k, v, 10**12, impl=impl)
    grads_huge = torch.autograd.grad(huge.sum(), (q, k, v))
    one_block = landmark_attention(q, k, v, k.shape[2] + 5, impl="reference")
    grads_one = torch.autograd.grad(one_block.sum(), (q, k, v))
    assert torch.allclose(huge, one_block, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads_huge, grads_one))


@pytest.mark.parametrize("block_size", [4.0, "4", True])
def test_block_size_not_int(block_size):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="block_size must be an int"):
        landmark_attention(q, k, v, block_size)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k must have the dtype of q \(torch.float32\); got torch.float64"):
        landmark_attention(q, k.double(), v, 4)
    with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\); got torch.bfloat16"):
        landmark_attention(q, k, v.bfloat16(), 4)


def test_mixed_devices():
    q, k, v = qkv()
    meta_k = k.to("meta")
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\); got meta"):
        landmark_attention(q, meta_k, v, 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_inputs(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=f"q must be a floating-point tensor .*got dtype {dtype}"):
        landmark_attention(q.to(dtype), k, v, 4)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(
        TypeError, match=r"v must be a torch.Tensor of shape \(batch, kv_heads, k_len, head_dim\)"
    ):
        landmark_attention(q, k, v.tolist(), 4)


def test_unknown_impl():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'reference', 'blockwise', 'triton'"):
        landmark_attention(q, k, v, 4, impl="flash")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        landmark_attention(q, k, v, 4, scale=scale)


def test_empty_query():
    q, k, v = qkv(q_len=0)
    with pytest.raises(ValueError, match="q must have batch, q_len and head_dim >= 1"):
        landmark_attention(q, k, v, 4)
