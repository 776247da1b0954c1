"""The fixed graph of tensor operations (``landmark.inference.graph``, ``kernel="graph"``) against the
reference (``kernel="torch"``): the same stream read through both, step by step.

Every case feeds the same chunks to two ``RetrievalCache``s, one per path, and compares the outputs of
every layer and step, the selections (traced), the counters and the memories afterwards: float64 to
1e-12, float32 and bfloat16 to rounding; odd block sizes, GQA, ragged rows (some with nothing new),
decode steps of one and two rows, fewer blocks than k, capped memories whose ring buffers wrap, every
granularity. Then the same through a converted Hugging Face model, block contents kept "elsewhere",
and the whole layer step under ``torch.compile(fullgraph=True)``: no graph break, the same outputs,
no new graph once the kinds of step have been seen.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from landmark.inference import RetrievalConfig, graph
from landmark.inference.cache import CacheOptions, RetrievalCache
from landmark.inference.retrieval import StepStats

BASE = 10000.0
# (new positions per row) of each step: full chunks, ragged rows, a row with nothing, decode steps
STEPS = [[20, 20, 20], [5, 9, 1], [17, 3, 0], [1, 1, 1], [2, 2, 2], [20, 20, 20], [2, 0, 7], [20, 13, 20]]


def read(kernel, steps, *, dtype=torch.float64, bs=8, k=3, heads=6, kv_heads=2, dim=16, max_blocks=None,
         granularity="token_head", seed=1, chunk=20):  # fmt: skip
    """Outputs of every (step, layer) of a two-layer stream read through ``kernel``, and the cache."""
    retrieval = RetrievalConfig(k=k, kernel=kernel, granularity=granularity, row_group=64)
    cache = RetrievalCache(2, block_size=bs, rope_base=BASE, retrieval=retrieval,
                           options=CacheOptions(chunk, max_blocks=max_blocks))  # fmt: skip
    cache.stats = StepStats(selections=[])
    g = torch.Generator().manual_seed(seed)
    outs = []
    for lens in steps:
        width = max(max(lens), 1)
        shape = (len(lens), kv_heads, width, dim)
        q = torch.randn(len(lens), heads, width, dim, generator=g).to(dtype)
        k_new, v_new = torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)
        for layer in range(2):
            outs.append(cache.attend(layer, q, k_new, v_new, torch.tensor(lens)))
    return outs, cache


def assert_same_stream(a, b, tol):
    (outs_a, cache_a), (outs_b, cache_b) = a, b
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert (x.double() - y.double()).abs().max() <= tol, i
    for m_a, m_b in zip(cache_a.memories, cache_b.memories):
        assert (m_a.count, m_a.start, m_a.evicted) == (m_b.count, m_b.start, m_b.evicted)
        for t_a, t_b in zip(m_a.logical_blocks().values(), m_b.logical_blocks().values()):
            assert torch.equal(t_a, t_b)
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        assert torch.equal(layer_a.tail_len, layer_b.tail_len) and torch.equal(layer_a.length, layer_b.length)
    s_a, s_b = cache_a.stats, cache_b.stats
    assert (s_a.local_positions, s_a.landmarks_scored, s_a.block_heads_fetched) == (
        s_b.local_positions, s_b.landmarks_scored, s_b.block_heads_fetched)  # fmt: skip


def assert_same_selections(reference_stats, graph_stats):
    """Traced selections: the reference's (B, H, C, min(k, blocks)) equal the graph's first columns; the
    graph's further columns (K = k fixed) are -1."""
    assert len(reference_stats.selections) == len(graph_stats.selections) > 0
    for ref, ours in zip(reference_stats.selections, graph_stats.selections):
        assert torch.equal(ours[..., : ref.shape[-1]], ref)
        assert bool((ours[..., ref.shape[-1] :] == -1).all())


TRITON = pytest.param("triton", marks=[pytest.mark.slow, pytest.mark.triton])  # the interpreter: slow


@pytest.mark.parametrize("kernel", ["graph", TRITON])
@pytest.mark.parametrize("granularity", ["token_head", "token", "head"])
@pytest.mark.parametrize("max_blocks", [None, 5], ids=["unlimited", "ring"])
def test_graph_equals_the_reference_float64(granularity, max_blocks, kernel):
    """(``kernel="triton"``: the graph's selection, the Triton attention; tests/test_triton_retrieval.py)"""
    kw = dict(granularity=granularity, max_blocks=max_blocks)
    ref, ours = read("torch", STEPS, **kw), read(kernel, STEPS, **kw)
    assert_same_stream(ref, ours, 1e-12)
    assert_same_selections(ref[1].stats, ours[1].stats)
    if max_blocks:
        assert any(ours[1].memories[0].start), "the ring buffer wrapped"


@pytest.mark.parametrize(
    "bs, k, heads, kv_heads, dim",
    [(5, 2, 4, 4, 8), (7, 4, 9, 3, 12), (8, 1, 2, 1, 6), (4, 6, 6, 2, 10)],
    ids=["bs5", "gqa3-bs7", "k1-mqa", "k-above-blocks"],
)
def test_graph_equals_the_reference_at_odd_sizes(bs, k, heads, kv_heads, dim):
    kw = dict(bs=bs, k=k, heads=heads, kv_heads=kv_heads, dim=dim, seed=bs + k)
    ref, ours = read("torch", STEPS, **kw), read("graph", STEPS, **kw)
    assert_same_stream(ref, ours, 1e-12)
    assert_same_selections(ref[1].stats, ours[1].stats)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_graph_equals_the_reference_in_low_precision(dtype, tol):
    ref, ours = read("torch", STEPS, dtype=dtype), read("graph", STEPS, dtype=dtype)
    assert_same_stream(ref, ours, tol)


def test_graph_writes_blocks_kept_elsewhere_after_the_step(monkeypatch):
    """Block contents on another device than the model (``memory_device``): the step hands its complete
    blocks back and the memory writes them where they live; the same stream as the reference."""
    original = graph.graph_step
    handed = []

    def elsewhere(host, retrieval, memory, q, scale, rope_base):
        memory.storage_device = torch.device("cpu", 0)  # compares unequal to the model's "cpu"
        step = original(host, retrieval, memory, q, scale, rope_base)
        handed.append(step.config.blocks)
        return step

    monkeypatch.setattr(graph, "graph_step", elsewhere)
    ref, ours = read("torch", STEPS, max_blocks=5), read("graph", STEPS, max_blocks=5)
    assert "return" in handed and "store" not in handed
    assert_same_stream(ref, ours, 1e-12)


def test_graph_is_chosen_off_the_cpu_and_refuses_other_searches():
    auto = RetrievalConfig()
    assert auto.takes_graph(torch.float32, torch.device("cuda"), None)
    assert not auto.takes_graph(torch.float32, torch.device("cpu"), None)
    assert not RetrievalConfig(search="bounded").takes_graph(torch.float32, torch.device("cuda"), None)
    assert RetrievalConfig(kernel="graph").takes_graph(torch.float32, torch.device("cpu"), None)
    with pytest.raises(ValueError, match='search must be "exact"'):
        RetrievalConfig(kernel="graph", search="bounded")


def test_hf_model_reads_and_decodes_the_same_through_the_graph():
    """A converted Llama (GQA, batch of two), k below the blocks held: a chunked prompt and token-by-
    token decoding give the reference's logits."""
    pytest.importorskip("transformers")
    from hf_helpers import cache_arg, converted

    from landmark.data import insert_landmarks
    from landmark.hf.retrieval import LandmarkRetrievalCache

    model, _ = converted()
    lid = model.config.landmark_token_id
    raw = torch.randint(0, lid, (2, 70), generator=torch.Generator().manual_seed(1))
    ids = insert_landmarks(raw, 8, lid)
    logits = {}
    for kernel in ("torch", "graph"):
        with torch.no_grad():
            cache = LandmarkRetrievalCache(model, RetrievalConfig(k=2, kernel=kernel), chunk_len=16)
            steps = [model(ids[:, :40], **cache_arg(model, cache)).logits]
            steps += [model(ids[:, i : i + 1], **cache_arg(model, cache)).logits for i in range(40, 80)]
            logits[kernel] = torch.cat(steps, 1)
    torch.testing.assert_close(logits["graph"], logits["torch"], atol=1e-4, rtol=1e-4)


def test_the_layer_step_compiles_whole_and_stops_recompiling(monkeypatch):
    """``torch.compile(fullgraph=True)`` of the layer step (a graph break would raise): the reference's
    outputs, and once every kind of step has been seen (chunk, last chunk, decode steps that complete a
    block or not, ragged), more steps of those kinds add no graph. The ``aot_eager`` backend captures
    the graph without generating code, to stay fast."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = torch.compile(graph.layer_step, fullgraph=True, backend="aot_eager")
    monkeypatch.setattr(graph, "compiled_layer_step", lambda: compiled)
    kinds = [[20, 20, 20]] * 3 + [
        [1, 1, 1],
        [2, 2, 2],
        [1, 1, 1],
        [2, 2, 2],
        [20, 20, 20],
        [7, 2, 9],
        [9, 9, 9],
    ]
    retrieval = RetrievalConfig(k=3, kernel="graph", compile=True)
    cache = RetrievalCache(2, block_size=8, rope_base=BASE, retrieval=retrieval, options=CacheOptions(20))
    cache.prepare(3, 2, 16, torch.float32, "cpu")
    cache.reserve(128)  # the memory's capacity is set: its growth would add a graph or two
    eager = RetrievalConfig(k=3, kernel="torch")
    reference = RetrievalCache(2, block_size=8, rope_base=BASE, retrieval=eager, options=CacheOptions(20))
    g = torch.Generator().manual_seed(3)
    graphs = []
    for phase in (kinds, kinds, kinds):
        for lens in phase:
            q = torch.randn(3, 6, max(lens), 16, generator=g)
            k_new, v_new = torch.randn(2, 3, 2, max(lens), 16, generator=g)
            for layer in range(2):
                ours = cache.attend(layer, q, k_new, v_new, torch.tensor(lens))
                expected = reference.attend(layer, q, k_new, v_new, torch.tensor(lens))
                assert (ours - expected).abs().max() < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1], graphs


def test_a_state_read_through_the_graph_saves_and_continues(tmp_path):
    """The graph path's layers share their step's tail lengths: the saved state holds one copy per layer
    (safetensors refuses shared tensors) and continues like the cache that read it."""
    _, cache = read("graph", STEPS)
    path = tmp_path / "state.safetensors"
    cache.save(path, "model-id")
    again = RetrievalCache(2, block_size=8, rope_base=BASE, retrieval=RetrievalConfig(k=3, kernel="graph"),
                           options=CacheOptions(20))  # fmt: skip
    again.load(path, "model-id")
    g = torch.Generator().manual_seed(9)
    q = torch.randn(3, 6, 5, 16, dtype=torch.float64, generator=g)
    k, v = torch.randn(2, 3, 2, 5, 16, dtype=torch.float64, generator=g)
    for layer in range(2):
        assert torch.equal(cache.attend(layer, q, k, v), again.attend(layer, q, k, v))
