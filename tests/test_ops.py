"""Landmark attention: the blockwise implementation against the reference, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from landmark import config, landmark_attention, landmark_attention_reference

# (batch, heads, kv_heads, q_len, k_len, head_dim, block_size)
CASES = [
    (1, 2, 2, 10, 10, 8, 4),  # q_len not a multiple of block_size
    (2, 4, 2, 37, 37, 16, 16),  # batch > 1, GQA
    (1, 3, 3, 100, 100, 24, 51),  # the paper's block (50 + 1)
    (1, 2, 1, 130, 130, 64, 64),  # multi-query, partial last block
    (2, 2, 2, 64, 128, 32, 64),  # q_len < k_len, aligned to blocks
    (1, 4, 2, 23, 97, 8, 16),  # q_len < k_len, unaligned
    (1, 2, 2, 1, 1, 8, 4),  # a single token
    (1, 2, 1, 1, 77, 16, 16),  # one query at the end of a long key sequence (decode-like)
    (1, 2, 2, 45, 45, 128, 4),  # head_dim 128, many blocks
    (1, 6, 3, 70, 90, 40, 7),  # odd everything
]
IDS = [f"B{b}-H{h}-Hkv{hk}-Tq{tq}-Tk{tk}-D{d}-bs{bs}" for b, h, hk, tq, tk, d, bs in CASES]


def make_inputs(case, dtype=torch.float64, seed=0, magnitude=1.0):
    batch, heads, kv_heads, q_len, k_len, head_dim, _ = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=g, dtype=torch.float64)
    grad = torch.randn(batch, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


def run(fn, qkv, grad):
    """Output and q/k/v gradients of fn(q, k, v), as float64."""
    leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad)
    return [t.detach().double() for t in (out, *grads)]


def max_errors(results, expected):
    return [(a - b).abs().max().item() for a, b in zip(results, expected)]


@pytest.fixture(params=["one-block-tiles", "default-tiles", "one-tile"])
def tile_budget(request, monkeypatch):
    """Run each case with tiles of one block of rows, the default, and all rows in a single tile."""
    rows = {"one-block-tiles": 1, "default-tiles": config.BLOCKWISE_TILE_ROWS, "one-tile": 1 << 30}
    monkeypatch.setattr(config, "BLOCKWISE_TILE_ROWS", rows[request.param])
    return request.param


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_blockwise_equals_reference_fp64(case, tile_budget, poison_empty):
    bs = case[-1]
    qkv, grad = make_inputs(case)
    ref = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="reference"), qkv, grad)
    got = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="blockwise"), qkv, grad)
    for name, err in zip(("out", "dq", "dk", "dv"), max_errors(got, ref)):
        assert err < 1e-10, f"{name}: max abs error {err:.3e}"


@pytest.mark.parametrize("case", CASES[:6], ids=IDS[:6])
def test_blockwise_equals_reference_fp32(case):
    bs = case[-1]
    qkv64, grad64 = make_inputs(case)
    truth = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="reference"), qkv64, grad64)
    qkv, grad = make_inputs(case, torch.float32)
    got = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="blockwise"), qkv, grad)
    for name, err, t in zip(("out", "dq", "dk", "dv"), max_errors(got, truth), truth):
        assert err < 2e-5 * max(1.0, t.abs().max().item()), f"{name}: max abs error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "case", [(1, 2, 1, 75, 75, 16, 16), (2, 4, 2, 130, 130, 32, 64)], ids=["bs16", "bs64"]
)
def test_large_magnitude_scores(case, dtype):
    """q, k scaled by 30: scores in the thousands; per-group maxima must keep everything finite.

    fp64 must match tightly; fp32 must be within 2x of the dense reference computed in fp32 (rounding
    scores of ~1000 to fp32 costs ~1e-4 relative in the weights, for every implementation).
    """
    bs = case[-1]
    qkv64, grad64 = make_inputs(case, magnitude=30.0)
    truth = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="reference"), qkv64, grad64)
    qkv, grad = make_inputs(case, dtype, magnitude=30.0)
    got = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="blockwise"), qkv, grad)
    same_dtype = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="reference"), qkv, grad)
    for name, err, base, g in zip(
        ("out", "dq", "dk", "dv"), max_errors(got, truth), max_errors(same_dtype, truth), got
    ):
        assert torch.isfinite(g).all(), f"{name} is not finite"
        bound = 1e-10 if dtype == torch.float64 else 2 * base + 1e-6
        assert err <= bound, f"{name}: max abs error {err:.3e}, bound {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=[IDS[1], IDS[4], IDS[5]])
def test_low_precision_rule(case, dtype):
    """Error against fp64 at most 2x the error of the reference computed in the same dtype."""
    bs = case[-1]
    qkv64, grad64 = make_inputs(case)
    truth = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="reference"), qkv64, grad64)
    qkv, grad = make_inputs(case, dtype)
    # The baseline: the dense reference with every operation in the low dtype (no fp32 accumulation).
    baseline = run(lambda q, k, v: landmark_attention_reference(q, k, v, bs, upcast=False), qkv, grad)
    got = run(lambda q, k, v: landmark_attention(q, k, v, bs, impl="blockwise"), qkv, grad)
    out = landmark_attention(*qkv, bs, impl="blockwise")
    assert out.dtype == dtype
    for name, err, base in zip(
        ("out", "dq", "dk", "dv"), max_errors(got, truth), max_errors(baseline, truth)
    ):
        assert err <= 2 * base + 1e-5, f"{name}: error {err:.3e} vs same-dtype reference {base:.3e}"


def test_hand_worked_example():
    """Five positions, block_size 3: 0 1 [L2] | 3 4. Scores s_j = k_j with exp(k) = 1, 2, 3, 1, 2.

    Worked out by hand from the definition (a_ij, docs/method.md, "Training: the grouped softmax"):
      query 0: own block {0}                             -> [1, 0, 0, 0, 0]
      query 1: own block {0, 1}: e = 1, 2                 -> [1/3, 2/3, 0, 0, 0]
      query 2 (landmark): own block's regular tokens only -> [1/3, 2/3, 0, 0, 0]
      query 3: group {L2: 3, 3: 1}, Z = 4; L2's 3/4 split 1:2 over {0, 1}
                                                           -> [1/4, 1/2, 0, 1/4, 0]
      query 4: group {L2: 3, 3: 1, 4: 2}, Z = 6            -> [1/6, 2/6, 0, 1/6, 2/6]
    With v = identity, the output rows are these weights.
    """
    import math

    exps = [1.0, 2.0, 3.0, 1.0, 2.0]
    q = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    k[0, 0, :, 0] = torch.tensor([math.log(e) for e in exps], dtype=torch.float64)
    v = torch.eye(5, dtype=torch.float64)[None, None]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1 / 3, 2 / 3, 0, 0, 0],
            [1 / 3, 2 / 3, 0, 0, 0],
            [1 / 4, 1 / 2, 0, 1 / 4, 0],
            [1 / 6, 2 / 6, 0, 1 / 6, 2 / 6],
        ],
        dtype=torch.float64,
    )
    for impl in ("reference", "blockwise"):
        out = landmark_attention(q, k, v, 3, scale=1.0, impl=impl)[0, 0]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12, msg=f"impl={impl}")
    # The last three queries alone (q_len < k_len): the same rows.
    out = landmark_attention(q[:, :, 2:], k, v, 3, scale=1.0, impl="blockwise")[0, 0]
    torch.testing.assert_close(out, expected[2:], rtol=0, atol=1e-12)


def test_no_nan_in_extreme_half_precision():
    case = (1, 2, 2, 70, 70, 32, 16)
    qkv, grad = make_inputs(case, torch.float16, magnitude=30.0)
    for t in run(lambda q, k, v: landmark_attention(q, k, v, 16, impl="blockwise"), qkv, grad):
        assert torch.isfinite(t).all()


def test_auto_uses_blockwise_on_cpu(monkeypatch):
    calls = []
    from landmark.ops import attention

    real = attention.blockwise_forward

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(attention, "blockwise_forward", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qkv, _ = make_inputs(CASES[0], torch.float32)
    landmark_attention(*qkv, 4)
    assert calls == [4]


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qkv, _ = make_inputs((1, 1, 1, 16, 16, 16, 16), torch.float32)
    with pytest.raises(ValueError, match=r"impl='triton' cannot run here: .*CUDA"):
        landmark_attention(*qkv, 16, impl="triton")


def test_triton_refuses_unsupported_block_size():
    qkv, _ = make_inputs((1, 1, 1, 16, 16, 16, 16), torch.float32)
    with pytest.raises(ValueError, match="block_size must be one of"):
        landmark_attention(*qkv, 51, impl="triton")


def test_library_op_registration():
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    qkv, _ = make_inputs((1, 2, 1, 20, 33, 8, 4), torch.float32)
    q, k, v = (t.requires_grad_(True) for t in qkv)
    torch.library.opcheck(torch.ops.landmark.blockwise_forward.default, (q, k, v, 4, 0.3))


def test_torch_compile_blockwise():
    """The blockwise op inside a compiled function (fullgraph): same output and gradients as eager."""
    case = (1, 2, 1, 40, 40, 16, 8)
    qkv, grad = make_inputs(case, torch.float32)

    def layer(q, k, v):
        return torch.nn.functional.gelu(landmark_attention(q * 1.5, k, v, 8, impl="blockwise")) * 2

    eager = run(layer, qkv, grad)
    compiled = run(torch.compile(layer, fullgraph=True, dynamic=False), qkv, grad)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
