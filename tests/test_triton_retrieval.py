"""The Triton attention of the retrieval step (``kernel="triton"``: the fixed graph's selection, the
selected blocks read where they are stored, ``landmark/inference/triton_retrieval.py``) against the
reference (``kernel="torch"``): the same stream read through both, step by step, as tests/test_graph.py
does for the graph.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (conftest.py sets
``TRITON_INTERPRET=1`` before triton is imported). Outputs: float64 to 1e-12, float32 to 1e-5, bfloat16
and float16 to rounding; selections, counters and memories identical; odd block sizes and head dims
(padded to powers of two in the kernel), GQA and MQA, ragged rows and rows with nothing new, decode
steps, fewer blocks than k, wrapped ring buffers, every granularity, int8 and half block storage.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_graph import assert_same_selections, assert_same_stream, read

from landmark.inference import RetrievalConfig

pytestmark = pytest.mark.triton

# The interpreter runs one program per (batch row, head, query row) in Python: small streams that still
# hold more blocks than k, a ragged row with nothing new, decode steps of one and two rows and, with a
# cap of 3 blocks, a ring buffer that wraps. (tests/test_graph.py's float64 grid runs it too with
# -m slow, and scripts/gpu_check.sh compiled on a GPU.)
SMALL = [[6, 6], [3, 0], [1, 1], [2, 2], [6, 4], [1, 1], [5, 6]]
SIZES = dict(bs=4, k=2, heads=4, kv_heads=2, dim=8, chunk=8)
slow = pytest.mark.slow


@pytest.mark.parametrize(
    "granularity, max_blocks",
    [("token_head", 3), ("token", None), ("head", 3), *[pytest.param(g, m, marks=slow) for g, m in
     [("token_head", None), ("token", 3), ("head", None)]]],
)  # fmt: skip
def test_triton_equals_the_reference_float64_small(granularity, max_blocks):
    kw = dict(SIZES, granularity=granularity, max_blocks=max_blocks)
    ref, ours = read("torch", SMALL, **kw), read("triton", SMALL, **kw)
    assert_same_stream(ref, ours, 1e-12)
    assert_same_selections(ref[1].stats, ours[1].stats)
    assert max(ours[1].memories[0].count) > SIZES["k"]
    if max_blocks:
        assert any(ours[1].memories[0].start), "the ring buffer wrapped"


@pytest.mark.parametrize(
    "bs, k, heads, kv_heads, dim",
    [
        pytest.param(5, 2, 2, 2, 8, marks=slow),
        (3, 2, 3, 1, 12),
        pytest.param(4, 1, 2, 1, 6, marks=slow),
        (4, 6, 2, 2, 10),
    ],
    ids=["bs5", "mqa3-bs3-dim12", "k1-mqa-dim6", "k-above-blocks"],
)
def test_triton_equals_the_reference_at_odd_sizes(bs, k, heads, kv_heads, dim):
    kw = dict(bs=bs, k=k, heads=heads, kv_heads=kv_heads, dim=dim, seed=bs + k, chunk=8)
    ref, ours = read("torch", SMALL, **kw), read("triton", SMALL, **kw)
    assert_same_stream(ref, ours, 1e-12)
    assert_same_selections(ref[1].stats, ours[1].stats)


@pytest.mark.parametrize(
    "dtype, tol",
    [
        pytest.param(torch.float32, 1e-5, marks=slow),
        (torch.bfloat16, 3e-2),
        pytest.param(torch.float16, 4e-3, marks=slow),
    ],
)
def test_triton_equals_the_reference_in_low_precision(dtype, tol):
    """The kernel accumulates half inputs in float32, the reference in the input dtype: the difference
    is the reference's own rounding."""
    ref, ours = read("torch", SMALL, dtype=dtype, **SIZES), read("triton", SMALL, dtype=dtype, **SIZES)
    assert_same_stream(ref, ours, tol)


@pytest.mark.parametrize(
    "block_dtype, tol",
    [("int8", 1e-5), *[pytest.param(d, 1e-5, marks=slow) for d in ("float16", "bfloat16")]],
)
def test_triton_reads_compact_blocks_as_the_reference(monkeypatch, block_dtype, tol):
    """Blocks stored as int8 (times their scales, applied as the kernel loads them) or in half precision:
    the reference reading the same stored numbers gives the same outputs."""
    import test_graph

    real = test_graph.RetrievalConfig

    def compact(**kw):
        return real(**kw, block_dtype=block_dtype)

    monkeypatch.setattr(test_graph, "RetrievalConfig", compact)
    kw = dict(SIZES, dtype=torch.float32, max_blocks=3)
    ref, ours = read("torch", SMALL, **kw), read("triton", SMALL, **kw)
    assert ours[1].memories[0].blocks.keys.dtype == real(block_dtype=block_dtype).storage_dtype
    assert_same_stream(ref, ours, tol)


def test_triton_is_asked_for_and_needs_exact_search():
    config = RetrievalConfig(kernel="triton")
    assert config.takes_graph(torch.float32, torch.device("cpu"), None)
    assert config.kernel_for(torch.float32, torch.device("cpu"), None) is None  # not the C++ kernel
    with pytest.raises(ValueError, match='search must be "exact"'):
        RetrievalConfig(kernel="triton", search="bounded")


@slow
def test_triton_runs_a_converted_hf_model_as_the_reference():
    """A converted Llama (GQA, batch of two): a chunked prompt and token-by-token decoding through the
    Triton attention give the reference's logits."""
    pytest.importorskip("transformers")
    from hf_helpers import cache_arg, converted

    from landmark.data import insert_landmarks
    from landmark.hf.retrieval import LandmarkRetrievalCache

    model, _ = converted()
    bs, lid = model.config.landmark_block_size, model.config.landmark_token_id
    tokens = torch.randint(0, 100, (2, 70), generator=torch.Generator().manual_seed(5))
    ids = insert_landmarks(tokens, bs, lid)
    logits = {}
    with torch.no_grad():
        for kernel in ("torch", "triton"):
            cache = LandmarkRetrievalCache(model, RetrievalConfig(k=2, kernel=kernel), chunk_len=16)
            steps = [model(ids[:, :40], **cache_arg(model, cache)).logits]
            steps += [model(ids[:, i : i + 1], **cache_arg(model, cache)).logits for i in range(40, 60)]
            logits[kernel] = torch.cat(steps, 1)
    assert (logits["torch"] - logits["triton"]).abs().max() < 1e-4
