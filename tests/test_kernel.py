"""The fused C++ retrieval kernel against the eager path (outputs, selections, ties, fallbacks).

The eager path of ``retrieval_attention`` is the reference. The kernel serves prefill chunks and
decode steps alike; every case below runs both (``RetrievalConfig(kernel="cpp")`` and ``"torch"``)
on the same inputs: odd sizes, GQA, ragged batches, rows with different memory sizes, memories that
have evicted blocks (ring buffer wrapped), fewer blocks than k, head dims that are not a multiple of
the kernel's vector width.
"""

from __future__ import annotations

import shutil
import warnings

import inference_helpers
import pytest
import torch

from landmark.data.landmarks import insert_landmarks
from landmark.inference import InferenceSession, RetrievalConfig
from landmark.inference import kernel as kn
from landmark.inference.retrieval import StepStats, top_k_blocks
from landmark.inference.session import chunked_nll
from landmark.model import GPT, ModelConfig, apply_rope, rope_angles

pytestmark = [
    pytest.mark.skipif(
        shutil.which("c++") is None and shutil.which("g++") is None,
        reason="no C++ compiler to build the kernel",
    ),
    pytest.mark.usefixtures("one_thread"),
]
BASE = 10000.0


def random_memory(batch, kv_heads, bs, dim, n, seed, same_landmarks=False, **kw):
    """``n`` random blocks in every row (``n`` may be a list: one count per row)."""
    counts = n if isinstance(n, list) else [n] * batch
    return inference_helpers.random_memory(batch, kv_heads, counts, bs, dim, seed, same_landmarks, **kw)


def both(q, lk, lv, local_len, q_start, q_len, memory, k, bs, dim):
    """Outputs and counters of the eager path and of the kernel, on the same step."""
    out, stats = {}, {}
    for kernel in ("torch", "cpp"):
        stats[kernel] = StepStats()
        retrieval = RetrievalConfig(k=k, kernel=kernel)
        assert (retrieval.kernel_for(q.dtype, q.device, memory) is not None) == (kernel == "cpp")
        out[kernel] = inference_helpers.attend(
            q, lk, lv, local_len, q_start, q_len, memory, retrieval, bs, BASE, dim**-0.5, stats[kernel]
        )
    return out, stats


def random_step(batch, heads, kv_heads, dim, rows, tails, q_len, seed):
    """Queries and local context of a step: row b has tail tails[b] and q_len[b] real new positions."""
    g = torch.Generator().manual_seed(seed)
    local_len = tails + q_len
    width = int((tails + rows).max())
    q = torch.randn(batch, heads, rows, dim, generator=g)
    lk = torch.randn(batch, kv_heads, width, dim, generator=g)
    lv = torch.randn(batch, kv_heads, width, dim, generator=g)
    return q, lk, lv, local_len


@pytest.mark.parametrize(
    "batch, heads, kv_heads, dim, bs, n, k",
    [
        (1, 2, 2, 8, 4, 6, 2),  # small
        (2, 6, 2, 8, 8, 13, 3),  # GQA, odd k
        (3, 6, 3, 16, 5, 9, 4),  # odd block size, three rows
        (2, 4, 1, 6, 7, 5, 5),  # n == k (every block selected), head_dim below the vector width
        (1, 4, 4, 32, 16, 40, 1),  # k = 1
        # 64 old blocks or more: the float scan where the keys are stored, then the exact candidates
        (2, 6, 2, 24, 8, 150, 4),  # head_dim not a multiple of the vector width
        (1, 8, 1, 16, 4, 97, 3),  # eight query heads on one kv head: scans of six queries and the rest
    ],
)
def test_kernel_matches_eager_decode_step(batch, heads, kv_heads, dim, bs, n, k):
    """Every tail length and both decode step sizes (a token; a token and its landmark), rows of a batch
    with different tails: the same outputs and counters as the eager path."""
    memory = random_memory(batch, kv_heads, bs, dim, n, seed=n)
    for rows in (1, 2):
        for first_tail in range(bs - rows + 1):
            tails = torch.tensor([(first_tail + 2 * b) % (bs - rows + 1) for b in range(batch)])
            q_len = torch.full((batch,), rows)
            q, lk, lv, local_len = random_step(batch, heads, kv_heads, dim, rows, tails, q_len, first_tail)
            out, stats = both(q, lk, lv, local_len, tails, q_len, memory, k, bs, dim)
            assert (out["cpp"] - out["torch"]).abs().max() < 1e-5, (rows, first_tail)
            assert stats["cpp"] == stats["torch"]


@pytest.mark.parametrize(
    "heads, kv_heads, dim, bs, counts, k, rows",
    [
        (4, 4, 32, 16, [40, 40], 4, 37),  # chunk longer than one tile of the kernel
        (6, 2, 20, 8, [3, 11], 4, 70),  # GQA; row 0 holds fewer blocks than k; dim not a multiple of 16
        (3, 3, 8, 5, [0, 9], 2, 23),  # an empty memory next to a full one; odd block size
        (8, 2, 64, 64, [70, 66], 4, 130),  # the shipped models' block size, several tiles
        (6, 2, 20, 8, [300, 129], 4, 40),  # old landmarks over several panels of the scan, a ragged last
        # the scan takes six queries at a time: tiles of 7, 10 and 22 queries leave 1, 4 and 4 over
        (2, 2, 16, 8, [150, 150], 3, 39),
        (4, 2, 16, 8, [150, 140], 4, 43),
        (3, 3, 16, 8, [150, 140], 4, 42),
    ],
)
def test_kernel_matches_eager_prefill_chunk(heads, kv_heads, dim, bs, counts, k, rows):
    """Prefill chunks with ragged rows (different tails, different numbers of real queries, different
    memory sizes): outputs to float rounding, padding rows zero."""
    memory = random_memory(2, kv_heads, bs, dim, counts, seed=sum(counts))
    tails = torch.tensor([bs - 2, 1])
    q_len = torch.tensor([rows, rows - 5])
    q, lk, lv, local_len = random_step(2, heads, kv_heads, dim, rows, tails, q_len, rows)
    out, stats = both(q, lk, lv, local_len, tails, q_len, memory, k, bs, dim)
    assert (out["cpp"] - out["torch"]).abs().max() < 2e-5
    assert out["cpp"][1, :, rows - 5 :].abs().max() == 0  # padding rows
    assert stats["cpp"].block_heads_fetched == stats["torch"].block_heads_fetched


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_kernel_attends_to_the_eager_selection_of_other_granularities(granularity):
    """Granularities "token" and "head": the eager path selects, the kernel attends (prefill chunks of
    several row groups, ragged rows, GQA, a decode step): the same outputs as the eager path."""
    memory = random_memory(2, 2, 8, 16, [14, 6], seed=9)
    for rows, row_group in ((70, 32), (2, 64)):
        tails, q_len = torch.tensor([3, 5]), torch.tensor([rows, max(1, rows - 9)])
        q, lk, lv, local_len = random_step(2, 6, 2, 16, rows, tails, q_len, rows)
        out = {}
        for kernel in ("torch", "cpp"):
            retrieval = RetrievalConfig(k=3, granularity=granularity, row_group=row_group, kernel=kernel)
            out[kernel] = inference_helpers.attend(
                q, lk, lv, local_len, tails, q_len, memory, retrieval, 8, BASE, 16**-0.5
            )
        assert (out["cpp"] - out["torch"]).abs().max() < 2e-5, rows


def test_kernel_reads_a_wrapped_ring_buffer():
    """A capped memory that has evicted blocks (logical order != storage order): same as eager."""
    memory = random_memory(2, 2, 8, 16, [12, 9], seed=2, max_blocks=7)
    assert any(memory.start)
    tails, q_len = torch.tensor([3, 0]), torch.tensor([40, 33])
    q, lk, lv, local_len = random_step(2, 4, 2, 16, 40, tails, q_len, 5)
    out, _ = both(q, lk, lv, local_len, tails, q_len, memory, 3, 8, 16)
    assert (out["cpp"] - out["torch"]).abs().max() < 2e-5


def test_kernel_decodes_over_a_wrapped_ring_buffer_of_many_blocks():
    """A decode step's scan where the keys are stored, over the two runs of slots of an evicting memory."""
    memory = random_memory(2, 2, 8, 16, [130, 100], seed=9, max_blocks=90)
    assert any(memory.start)
    for rows in (1, 2):
        tails, q_len = torch.tensor([3, 5]), torch.full((2,), rows)
        q, lk, lv, local_len = random_step(2, 6, 2, 16, rows, tails, q_len, rows)
        out, stats = both(q, lk, lv, local_len, tails, q_len, memory, 4, 8, 16)
        assert (out["cpp"] - out["torch"]).abs().max() < 2e-5, rows
        assert stats["cpp"] == stats["torch"]


def reference_selection(q, q_start, memory, k, bs):
    """The top-k blocks per (row, head, query) from float64 landmark scores at their scoring slots
    (docs/method.md), with the margin between the k-th and the (k+1)-th score."""
    batch, heads, rows, dim = q.shape
    group = heads // memory.kv_heads
    sel = torch.full((batch, heads, rows, k), -1, dtype=torch.long)
    margin = torch.full((batch, heads, rows), float("inf"))
    for b in range(batch):
        n = memory.count[b]
        ke = min(k, n)
        lm = memory.row_landmarks(b).double()  # (Hkv, n, D)
        for c in range(rows):
            q_pos = (ke + 1) * bs + int(q_start[b]) + c
            slot = torch.tensor([0 if i < n - ke else i - (n - ke) + 1 for i in range(n)])
            cos, sin = rope_angles(q_pos - slot * bs - (bs - 1), dim, BASE)  # (n, D/2)
            for h in range(heads):
                x = (q[b, h, c].double() * dim**-0.5).expand(n, dim)
                rot = apply_rope(x[None, None], cos.double(), sin.double())[0, 0]
                scores = (rot * lm[h // group]).sum(-1)
                sel[b, h, c, :ke] = top_k_blocks(scores.float()[None], ke)[0]
                if n > ke:
                    top = scores.topk(ke + 1).values
                    margin[b, h, c] = float(top[ke - 1] - top[ke])
    return sel, margin


def test_kernel_selects_the_blocks_the_landmarks_point_to():
    """The kernel's selection equals the top-k of float64 landmark scores wherever the k-th and the
    (k+1)-th score are not (nearly) tied."""
    memory = random_memory(2, 2, 8, 16, [30, 5], seed=4)
    tails, q_len = torch.tensor([2, 6]), torch.tensor([20, 20])
    q, lk, lv, local_len = random_step(2, 6, 2, 16, 20, tails, q_len, 8)
    _, selected = inference_helpers.kernel_step(q, lk, lv, local_len, tails, q_len, memory, 4, 16**-0.5)
    expected, margin = reference_selection(q, tails, memory, 4, 8)
    clear = margin > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(selected[clear], expected[clear])
    assert torch.equal(selected[1, :, :, :], expected[1])  # row 1 holds 5 blocks: every k-subset differs


def test_traced_selections_are_the_reference_top_k():
    """``StepStats(selections=[])`` (the trace of benchmarks/retrieval_trace.py) records, on both paths,
    the blocks of the float64 reference top-k where the k-th score is not nearly tied; -1 beyond a
    row's blocks and on its padding rows."""
    tails = torch.tensor([2, 6])
    # ragged rows (row 1: fewer blocks than k, 3 padding rows); rows alike (the eager path's uniform case)
    for counts, real in (([30, 3], [20, 17]), ([30, 30], [20, 20])):
        q_len = torch.tensor(real)
        q, lk, lv, local_len = random_step(2, 6, 2, 16, 20, tails, q_len, 8)
        memory = random_memory(2, 2, 8, 16, counts, seed=4)
        expected, margin = reference_selection(q, tails, memory, 4, 8)
        clear = margin > 1e-4
        clear[1, :, real[1] :] = False
        assert clear[0].float().mean() > 0.9
        for kernel in ("torch", "cpp"):
            stats = StepStats(selections=[])
            retrieval = RetrievalConfig(k=4, kernel=kernel)
            inference_helpers.attend(
                q, lk, lv, local_len, tails, q_len, memory, retrieval, 8, BASE, 16**-0.5, stats
            )
            traced = torch.cat(stats.selections, dim=2)  # the eager path records a group of rows at a time
            assert traced.shape == (2, 6, 20, 4), (counts, kernel)
            assert torch.equal(traced[clear], expected[clear]), (counts, kernel)  # 3 blocks: all, then -1
            assert bool((traced[1, :, real[1] :] == -1).all()), (counts, kernel)  # padding rows
    assert StepStats().selections is None  # no trace unless asked for


def test_kernel_breaks_ties_like_eager():
    """All landmark keys alike (a model's first layer): the tied old blocks are chosen by the same rule
    (the most recent win), so the outputs agree exactly, not just up to the choice among ties; in a
    decode step and in a prefill chunk."""
    memory = random_memory(2, 2, 8, 8, 40, seed=3, same_landmarks=True)
    for rows in (1, 2, 19):
        for tail in range(8 - min(rows, 2)):
            tails, q_len = torch.full((2,), tail), torch.full((2,), rows)
            q, lk, lv, local_len = random_step(2, 4, 2, 8, rows, tails, q_len, tail)
            out, _ = both(q, lk, lv, local_len, tails, q_len, memory, 3, 8, 8)
            assert (out["cpp"] - out["torch"]).abs().max() < 1e-5, (rows, tail)


def test_kernel_breaks_ties_among_duplicated_landmarks_like_eager():
    """Some landmark keys repeated among distinct ones (ties that only the exact re-check of the float
    scan's candidates can order): the prefill path selects the same blocks as the eager path, so the
    outputs agree; with more old blocks than a vector of the scan holds."""
    memory = random_memory(2, 2, 8, 8, 70, seed=6)
    for row in range(2):  # blocks 40..69 repeat the landmark keys of blocks 3..32
        memory.landmark_keys[row, :, 40:70] = memory.landmark_keys[row, :, 3:33]
    for rows in (1, 2, 5, 19):  # decode steps (the scan where the keys are stored) and prefill chunks
        tails, q_len = torch.tensor([1, 4]), torch.full((2,), rows)
        q, lk, lv, local_len = random_step(2, 4, 2, 8, rows, tails, q_len, rows)
        out, _ = both(q, lk, lv, local_len, tails, q_len, memory, 3, 8, 8)
        assert (out["cpp"] - out["torch"]).abs().max() < 1e-5, rows


@pytest.mark.parametrize("n, spread", [(90, 1e-5), (301, 1e-5), (120, 3e-7)])
def test_kernel_orders_nearly_tied_landmarks_like_eager(n, spread):
    """Landmark keys that differ only in their last digits (a converted model's first layer): every old
    block is a candidate of the float scan, and the kernel's exact scores order them as the eager
    path's float64 scores do (within one panel of the scan's copy of the keys, and across three)."""
    memory = random_memory(1, 2, 8, 16, n, seed=7)
    g = torch.Generator().manual_seed(8)
    key = memory.landmark_keys[:, :, :1].clone()
    # (3e-7: the float scan's rounding is larger than the gaps between scores: only its error bound
    # keeps the best blocks among the candidates)
    memory.landmark_keys[:, :, :n] = key * (1 + spread * torch.randn(1, 2, n, 16, generator=g))
    for rows in (1, 6, 33):
        tails, q_len = torch.tensor([3]), torch.full((1,), rows)
        q, lk, lv, local_len = random_step(1, 4, 2, 16, rows, tails, q_len, rows)
        out, _ = both(q, lk, lv, local_len, tails, q_len, memory, 4, 8, 16)
        assert (out["cpp"] - out["torch"]).abs().max() < 1e-5, rows
    if spread < 1e-6:  # (gaps below float resolution: the outputs above are the check)
        return
    expected, margin = reference_selection(q, tails, memory, 4, 8)
    _, selected = inference_helpers.kernel_step(q, lk, lv, local_len, tails, q_len, memory, 4, 16**-0.5)
    clear = margin > 1e-6
    assert clear.float().mean() > 0.5 and torch.equal(selected[clear], expected[clear])


def test_top_k_blocks_prefers_recent_blocks_among_ties():
    scores = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_k_blocks(scores, 3).tolist() == [[1, 4, 5], [3, 4, 5]]
    assert top_k_blocks(scores, 1).tolist() == [[1], [5]]
    x = torch.randn(4, 3, 50)  # no ties: the same set as torch.topk, ascending
    assert torch.equal(top_k_blocks(x, 5), x.topk(5).indices.sort().values)


def small_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_embd=48, n_head=6, n_kv_head=2, seq_len=64, block_size=8,
                      landmark_id=49)  # fmt: skip
    return GPT(cfg).eval()


def test_decoding_with_the_kernel_matches_eager_decoding():
    """A real (random) model, GQA, batch 2, decoding as generate() does (the token that completes a
    block goes in with its landmark): logits equal at every step."""
    model = small_model()
    ids = insert_landmarks(torch.randint(0, 49, (2, 160), generator=torch.Generator().manual_seed(1)), 8, 49)
    logits = {}
    for kernel in ("torch", "cpp"):
        session = InferenceSession(model, 2, k=3, chunk_len=16, kernel=kernel)
        session.feed(ids[:, :69])
        uses = session.retrieval.kernel_for(torch.float32, torch.device("cpu"), session.memories[0])
        assert (uses is not None) == (kernel == "cpp")
        steps, t = [], 69
        while t < ids.shape[1] - 1:
            width = 2 if t % 8 == 6 else 1  # a token and its landmark together
            steps.append(session.feed(ids[:, t : t + width])[:, :1])
            t += width
        logits[kernel] = torch.cat(steps, dim=1)
    assert (logits["cpp"] - logits["torch"]).abs().max() < 1e-4


def test_chunked_prefill_with_the_kernel_matches_eager():
    """A ragged batch read in chunks (rows of different lengths): the same losses either way."""
    model = small_model()
    tokens = torch.randint(0, 49, (3, 300), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([300, 171, 64])
    nll = {
        kernel: chunked_nll(model, tokens, lengths, k=2, chunk_len=40, kernel=kernel)[0]
        for kernel in ("torch", "cpp")
    }
    assert torch.allclose(nll["cpp"], nll["torch"], rtol=1e-5)


def test_kernel_only_where_it_applies():
    memory = random_memory(2, 2, 8, 8, 6, seed=1)
    cpu, f32 = torch.device("cpu"), torch.float32
    auto = RetrievalConfig(k=4)
    assert auto.kernel_for(f32, cpu, memory) is not None
    assert RetrievalConfig(k=7).kernel_for(f32, cpu, memory) is not None  # fewer blocks than k
    assert auto.kernel_for(torch.float64, cpu, memory) is None
    assert auto.kernel_for(torch.bfloat16, cpu, memory) is None  # low precision: the eager path
    head = RetrievalConfig(k=4, granularity="head")  # the eager path selects, the kernel attends
    assert head.kernel_for(f32, cpu, memory) is not None and not head.kernel_selects
    assert RetrievalConfig(k=4).kernel_selects
    assert RetrievalConfig(k=4, kernel="torch").kernel_for(f32, cpu, memory) is None
    assert auto.kernel_for(f32, cpu, None) is None
    with pytest.raises(ValueError, match="kernel must be one of"):
        RetrievalConfig(kernel="fast")


def test_unbuildable_kernel_falls_back_or_fails_clearly(monkeypatch):
    monkeypatch.setattr(kn, "_build", lambda: kn.KernelUnavailableError("no compiler (simulated)"))
    kn._warn_once.cache_clear()
    memory = random_memory(1, 2, 8, 8, 6, seed=1)
    cpu, f32 = torch.device("cpu"), torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert RetrievalConfig(k=4).kernel_for(f32, cpu, memory) is None
    assert any("no compiler (simulated)" in str(w.message) for w in caught)
    with pytest.raises(kn.KernelUnavailableError, match='kernel="cpp" but the C\\+\\+ retrieval kernel'):
        RetrievalConfig(k=4, kernel="cpp").kernel_for(f32, cpu, memory)


def test_kernel_survives_nan_landmark_keys():
    """A NaN landmark score never leaves a selection slot empty (no out-of-range block read, even with
    fewer finite scores than k): such blocks count as -inf; their contents are finite, so is the output."""
    memory = random_memory(1, 2, 8, 8, 5, seed=5)
    memory.landmark_keys[0, :, 1:4] = float("nan")  # 2 finite landmark scores, k = 4
    for rows in (1, 5):
        q = torch.randn(1, 4, rows, 8)
        lk, lv = torch.randn(1, 2, 2 + rows, 8), torch.randn(1, 2, 2 + rows, 8)
        retrieval = RetrievalConfig(k=4, kernel="cpp")
        q_len = torch.full((1,), rows)
        out = inference_helpers.attend(
            q, lk, lv, torch.tensor([2 + rows]), torch.tensor([2]), q_len, memory, retrieval, 8, BASE, 0.3
        )
        assert torch.isfinite(out).all()
    memory = random_memory(1, 2, 8, 8, 80, seed=5)  # a decode step's float scan over NaN keys
    memory.landmark_keys[0, :, 3:78] = float("nan")
    for rows in (1, 2):
        q = torch.randn(1, 4, rows, 8)
        lk, lv = torch.randn(1, 2, 2 + rows, 8), torch.randn(1, 2, 2 + rows, 8)
        retrieval = RetrievalConfig(k=4, kernel="cpp")
        q_len = torch.full((1,), rows)
        out = inference_helpers.attend(
            q, lk, lv, torch.tensor([2 + rows]), torch.tensor([2]), q_len, memory, retrieval, 8, BASE, 0.3
        )
        assert torch.isfinite(out).all()


def test_a_stale_build_lock_is_removed_and_a_young_one_is_reported(tmp_path):
    """A build killed midway leaves torch's lock file, and torch waits for it forever: one older than any
    build is removed; a young one (a build may be running) is waited for, with a warning."""
    import os
    import time

    old, young = tmp_path / "old", tmp_path / "young"
    old.touch()
    young.touch()
    past = time.time() - kn.STALE_LOCK_S - 5
    os.utime(old, (past, past))
    kn._clear_stale_lock(old)
    assert not old.exists()
    with pytest.warns(UserWarning, match="waiting for another build of the retrieval kernel"):
        kn._clear_stale_lock(young)
    assert young.exists()
    kn._clear_stale_lock(tmp_path / "none")  # no lock: nothing to do
