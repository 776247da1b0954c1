"""The fused C++ decode kernel against the eager decode path (outputs, selections, ties, fallbacks)."""

from __future__ import annotations

import shutil
import warnings

import inference_helpers
import pytest
import torch

from landmark.data.landmarks import insert_landmarks
from landmark.inference import InferenceSession, RetrievalConfig, retrieval_attention
from landmark.inference import decode_kernel as dk
from landmark.inference.retrieval import StepStats, top_k_blocks
from landmark.model import GPT, ModelConfig

pytestmark = [
    pytest.mark.skipif(
        shutil.which("c++") is None and shutil.which("g++") is None,
        reason="no C++ compiler to build the kernel",
    ),
    pytest.mark.usefixtures("one_thread"),
]
BASE = 10000.0


def random_memory(batch, kv_heads, bs, dim, n, seed, same_landmarks=False):
    """``n`` random blocks in every row."""
    return inference_helpers.random_memory(batch, kv_heads, [n] * batch, bs, dim, seed, same_landmarks)


def both(q, lk, lv, local_len, q_start, q_len, memory, k, bs, dim):
    out, stats = {}, {}
    for kernel in ("torch", "cpp"):
        stats[kernel] = StepStats()
        retrieval = RetrievalConfig(k=k, decode_kernel=kernel)
        assert (retrieval.kernel_for(q.shape[2], q_len, q.dtype, memory) is not None) == (kernel == "cpp")
        out[kernel] = retrieval_attention(
            q, lk, lv, local_len, q_start, q_len, memory, retrieval, bs, BASE, dim**-0.5, stats[kernel]
        )
    return out, stats


@pytest.mark.parametrize(
    "batch, heads, kv_heads, dim, bs, n, k",
    [
        (1, 2, 2, 8, 4, 6, 2),  # small
        (2, 6, 2, 8, 8, 13, 3),  # GQA, odd k
        (3, 6, 3, 16, 5, 9, 4),  # odd block size, three rows
        (2, 4, 1, 6, 7, 5, 5),  # n == k (every block selected), head_dim not a multiple of 8
        (1, 4, 4, 32, 16, 40, 1),  # k = 1
    ],
)
def test_kernel_matches_eager_step(batch, heads, kv_heads, dim, bs, n, k):
    """Every tail length and both step sizes (a token; a token and its landmark), rows of a batch with
    different tails: the same outputs and counters as the eager path."""
    memory = random_memory(batch, kv_heads, bs, dim, n, seed=n)
    g = torch.Generator().manual_seed(7)
    for rows in (1, 2):
        for first_tail in range(bs - rows + 1):
            tails = torch.tensor([(first_tail + 2 * b) % (bs - rows + 1) for b in range(batch)])
            width = int(tails.max()) + rows
            q = torch.randn(batch, heads, rows, dim, generator=g)
            lk = torch.randn(batch, kv_heads, width, dim, generator=g)
            lv = torch.randn(batch, kv_heads, width, dim, generator=g)
            q_len = torch.full((batch,), rows)
            out, stats = both(q, lk, lv, tails + rows, tails, q_len, memory, k, bs, dim)
            assert (out["cpp"] - out["torch"]).abs().max() < 1e-5, (rows, first_tail)
            assert stats["cpp"] == stats["torch"]


def test_kernel_breaks_ties_like_eager():
    """All landmark keys alike (a model's first layer): the tied old blocks are chosen by the same rule
    (the most recent win), so the outputs agree exactly, not just up to the choice among ties."""
    memory = random_memory(2, 2, 8, 8, 20, seed=3, same_landmarks=True)
    g = torch.Generator().manual_seed(4)
    for tail in range(7):
        q = torch.randn(2, 4, 1, 8, generator=g)
        lk, lv = torch.randn(2, 2, tail + 1, 8, generator=g), torch.randn(2, 2, tail + 1, 8, generator=g)
        local_len, q_start, q_len = torch.full((2,), tail + 1), torch.full((2,), tail), torch.ones(2).long()
        out, _ = both(q, lk, lv, local_len, q_start, q_len, memory, 3, 8, 8)
        assert (out["cpp"] - out["torch"]).abs().max() < 1e-5


def test_top_k_blocks_prefers_recent_blocks_among_ties():
    scores = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k_blocks(scores, 3).tolist() == [[1, 4, 5], [3, 4, 5]]
    assert top_k_blocks(scores, 1).tolist() == [[1], [5]]
    x = torch.randn(4, 3, 50)  # no ties: the same set as torch.topk, ascending
    assert torch.equal(top_k_blocks(x, 5), x.topk(5).indices.sort().values)


def test_decoding_with_the_kernel_matches_eager_decoding():
    """A real (random) model, GQA, batch 2 with different prompt lengths, decoding as generate() does
    (the token that completes a block goes in with its landmark): logits equal at every step."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_embd=48, n_head=6, n_kv_head=2, seq_len=64, block_size=8,
                      landmark_id=49)  # fmt: skip
    model = GPT(cfg).eval()
    ids = insert_landmarks(torch.randint(0, 49, (2, 160), generator=torch.Generator().manual_seed(1)), 8, 49)
    logits = {}
    for kernel in ("torch", "cpp"):
        session = InferenceSession(model, 2, k=3, chunk_len=16, decode_kernel=kernel)
        session.feed(ids[:, :69])
        uses = session.retrieval.kernel_for(1, torch.ones(2).long(), torch.float32, session.memories[0])
        assert (uses is not None) == (kernel == "cpp")
        steps, t = [], 69
        while t < ids.shape[1] - 1:
            width = 2 if t % 8 == 6 else 1  # a token and its landmark together
            steps.append(session.feed(ids[:, t : t + width])[:, :1])
            t += width
        logits[kernel] = torch.cat(steps, dim=1)
    assert (logits["cpp"] - logits["torch"]).abs().max() < 1e-4


def test_kernel_only_where_it_applies():
    memory = random_memory(2, 2, 8, 8, 6, seed=1)
    rows1 = torch.ones(2, dtype=torch.long)
    auto = RetrievalConfig(k=4)
    assert auto.kernel_for(1, rows1, torch.float32, memory) is not None
    assert auto.kernel_for(3, torch.full((2,), 3), torch.float32, memory) is None  # a prefill chunk
    assert auto.kernel_for(1, rows1, torch.float64, memory) is None
    assert RetrievalConfig(k=4, granularity="head").kernel_for(1, rows1, torch.float32, memory) is None
    assert RetrievalConfig(k=7).kernel_for(1, rows1, torch.float32, memory) is None  # fewer than k blocks
    assert RetrievalConfig(k=4, decode_kernel="torch").kernel_for(1, rows1, torch.float32, memory) is None
    assert auto.kernel_for(2, torch.tensor([2, 1]), torch.float32, memory) is None  # a padded row
    memory.append(0, torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8))
    assert auto.kernel_for(1, rows1, torch.float32, memory) is None  # rows hold different counts
    with pytest.raises(ValueError, match="decode_kernel must be one of"):
        RetrievalConfig(decode_kernel="fast")


def test_unbuildable_kernel_falls_back_or_fails_clearly(monkeypatch):
    monkeypatch.setattr(dk, "_build", lambda: dk.KernelUnavailableError("no compiler (simulated)"))
    dk._warn_once.cache_clear()
    memory = random_memory(1, 2, 8, 8, 6, seed=1)
    rows1 = torch.ones(1, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert RetrievalConfig(k=4).kernel_for(1, rows1, torch.float32, memory) is None
    assert any("no compiler (simulated)" in str(w.message) for w in caught)
    with pytest.raises(dk.KernelUnavailableError, match='decode_kernel="cpp" but the C\\+\\+ decode kernel'):
        RetrievalConfig(k=4, decode_kernel="cpp").kernel_for(1, rows1, torch.float32, memory)


def test_kernel_survives_nan_landmark_keys():
    """A NaN landmark score never leaves a selection slot empty (no out-of-range block read, even with
    fewer finite scores than k): such blocks count as -inf; their contents are finite, so is the output."""
    memory = random_memory(1, 2, 8, 8, 5, seed=5)
    memory.landmark_keys[0, :, 1:4] = float("nan")  # 2 finite landmark scores, k = 4
    q = torch.randn(1, 4, 1, 8)
    lk, lv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    retrieval = RetrievalConfig(k=4, decode_kernel="cpp")
    q_len = torch.ones(1).long()
    out = retrieval_attention(
        q, lk, lv, torch.tensor([3]), torch.tensor([2]), q_len, memory, retrieval, 8, BASE, 0.3
    )
    assert torch.isfinite(out).all()
