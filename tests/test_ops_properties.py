"""Property tests (hypothesis) of landmark attention over random shapes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from landmark import landmark_attention, landmark_weights


@st.composite
def shapes(draw):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    block_size = draw(st.integers(2, 20))
    k_len = draw(st.integers(1, 90))
    q_len = draw(st.integers(1, k_len))
    head_dim = draw(st.integers(1, 12))
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, heads, kv_heads, q_len, k_len, head_dim, block_size, seed


def inputs(shape, dtype=torch.float64):
    batch, heads, kv_heads, q_len, k_len, head_dim, _, seed = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, dtype=dtype) * 2
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=g, dtype=dtype) * 2
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=g, dtype=dtype)
    return q, k, v


def landmark_positions(k_len, block_size):
    return torch.arange(k_len) % block_size == block_size - 1


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_blockwise_equals_reference(shape):
    bs = shape[6]
    q, k, v = (t.requires_grad_(True) for t in inputs(shape))
    outs = {}
    for impl in ("reference", "blockwise"):
        out = landmark_attention(q, k, v, bs, impl=impl)
        outs[impl] = (out, *torch.autograd.grad(out, (q, k, v), torch.cos(out.detach() * 3)))
    for a, b in zip(outs["reference"], outs["blockwise"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_weights_rows_sum_to_one_and_landmarks_carry_nothing(shape):
    bs, k_len, q_len = shape[6], shape[4], shape[3]
    q, k, _ = inputs(shape)
    w = landmark_weights(q, k, bs)  # (B, H, Tq, Tk)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-12)
    assert (w[..., landmark_positions(k_len, bs)] == 0).all()
    assert (w >= 0).all()
    # Causal: row r (key position k_len - q_len + r) puts no weight on later positions.
    future = torch.arange(k_len)[None, :] > torch.arange(k_len - q_len, k_len)[:, None]
    assert (w[..., future] == 0).all()


@settings(max_examples=40, deadline=None)
@given(shapes())
def test_landmark_values_never_contribute(shape):
    bs, k_len = shape[6], shape[4]
    q, k, v = inputs(shape)
    v2 = v.clone()
    v2[:, :, landmark_positions(k_len, bs)] = 1e6
    torch.testing.assert_close(
        landmark_attention(q, k, v, bs, impl="blockwise"), landmark_attention(q, k, v2, bs, impl="blockwise")
    )


@settings(max_examples=40, deadline=None)
@given(shapes(), st.data())
def test_future_tokens_never_change_earlier_outputs(shape, data):
    batch, heads, kv_heads, _, k_len, head_dim, bs, seed = shape
    q, k, v = inputs((batch, heads, kv_heads, k_len, k_len, head_dim, bs, seed))  # queries at every position
    cut = data.draw(st.integers(0, k_len - 1))  # change every position > cut
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, cut + 1 :] = torch.randn_like(t[:, :, cut + 1 :])
    a = landmark_attention(q, k, v, bs, impl="blockwise")[:, :, : cut + 1]
    b = landmark_attention(q2, k2, v2, bs, impl="blockwise")[:, :, : cut + 1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
