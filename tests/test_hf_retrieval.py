"""Tests of landmark.hf.retrieval: top-k block retrieval for converted Hugging Face models.

Tiny random models (hidden 64, 2 layers, 4 heads, 2 kv heads, block size 8) built in-process. The
central invariant (docs/method.md): when k covers every block in memory, the stingy mapping puts
every block where it would be in one full pass (up to a constant shift that RoPE ignores), so chunked
prefill, token-by-token decoding and generation with a LandmarkRetrievalCache equal the converted
model's plain forward / DynamicCache generation.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_helpers import BS, cache_arg, converted  # noqa: E402

import landmark.hf as lhf  # noqa: E402
from landmark.data import insert_landmarks  # noqa: E402
from landmark.hf.retrieval import LandmarkLogitsProcessor, LandmarkRetrievalCache, unrotate  # noqa: E402
from landmark.inference import MemoryFullError, RetrievalConfig  # noqa: E402
from landmark.inference.cache import StateFiles  # noqa: E402
from landmark.inference.options import Reading  # noqa: E402

ALL = RetrievalConfig(k=64)  # more blocks than any test input holds: every block is retrieved
READ_ALL = Reading(k=64)  # the same, as generate's reading


def stream(batch: int, n_raw: int, seed: int = 1, model=None) -> torch.Tensor:
    """(batch, n) random token ids with landmarks inserted at p % BS == BS - 1."""
    lid = model.config.landmark_token_id
    raw = torch.randint(0, lid, (batch, n_raw), generator=torch.Generator().manual_seed(seed))
    return insert_landmarks(raw, BS, lid)


class _PastKeyValuesForward(torch.nn.Module):
    """A model whose forward takes its cache as ``past_key_values`` (transformers before 5.2x)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        return self.inner(
            input_ids=input_ids, use_cache=use_cache, **cache_arg(self.inner, past_key_values), **kwargs
        )


class _IgnoresCache(_PastKeyValuesForward):
    """A model that drops an unknown cache keyword into ``**kwargs`` and attends without it."""

    def forward(self, input_ids, use_cache=None, **kwargs):
        return self.inner(input_ids=input_ids)


def test_forward_cached_passes_the_cache_under_the_models_keyword():
    """forward_cached gives the cache as ``cache`` or ``past_key_values``, whichever the forward takes,
    reading the same as the model's own forward with the cache; a model that leaves the cache untouched
    raises."""
    model, _ = converted()
    ids = stream(1, 40, model=model)  # (1, 45)
    with torch.no_grad():
        expected = model(ids, **cache_arg(model, LandmarkRetrievalCache(model, ALL, chunk_len=16))).logits
        for m in (model, _PastKeyValuesForward(model)):
            cache = LandmarkRetrievalCache(model, ALL, chunk_len=16)
            out = torch.cat([lhf.forward_cached(m, ids[:, :30], cache).logits,
                             lhf.forward_cached(m, ids[:, 30:], cache).logits], dim=1)  # fmt: skip
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
            assert cache.get_seq_length() == ids.shape[1]
        with pytest.raises(RuntimeError, match="did not use the cache it was given"):
            lhf.forward_cached(_IgnoresCache(model), ids, LandmarkRetrievalCache(model, ALL))
        # the reader's position ids of zeros without the cache: named, not "positions 0..n expected"
        with pytest.raises(ValueError, match="need the retrieval cache"):
            model(ids, position_ids=torch.zeros_like(ids))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("granularity", ["token_head", "token", "head"])
def test_chunked_prefill_equals_full_forward(arch, granularity):
    model, _ = converted(arch)
    ids = stream(2, 100, model=model)  # (2, 114): 14 complete blocks and a tail
    with torch.no_grad():
        full = model(ids).logits
        cache = LandmarkRetrievalCache(model, RetrievalConfig(k=64, granularity=granularity), chunk_len=16)
        ours = model(ids, **cache_arg(model, cache)).logits
    torch.testing.assert_close(ours, full, atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]
    state = cache.stream.layers[0]
    assert state.memory.count == [14, 14] and state.tail_len.tolist() == [114 - 14 * BS] * 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unrotated_position_ids_equal_the_stream_positions(arch):
    """Position ids of zeros (the model's RoPE skipped, what hf_reader passes) give the outputs of the
    true stream positions (the model's RoPE undone by the cache) and of one full forward, chunk by
    chunk. (Only with every block retrieved: in layer 0 every landmark key is the same vector, an exact
    tie that the zeros keep and the tie rule settles, while rotating and un-rotating adds rounding
    that breaks the tie arbitrarily, so with k < blocks the two may select different blocks there.)"""
    model, _ = converted(arch)
    ids = stream(1, 150, seed=3, model=model)  # (1, 171)
    outs = []
    with torch.no_grad():
        for zeros in (False, True):
            cache = LandmarkRetrievalCache(model, ALL, chunk_len=24)
            chunks = []
            for c0 in range(0, ids.shape[1], 24):
                chunk = ids[:, c0 : c0 + 24]
                positions = torch.arange(c0, c0 + chunk.shape[1])[None]
                pos = cache.unrotated_position_ids(chunk.shape[1]) if zeros else positions
                chunks.append(model(chunk, **cache_arg(model, cache), position_ids=pos).logits)
            outs.append(torch.cat(chunks, dim=1))
        full = model(ids).logits
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1], full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("step", [1, 2, 5], ids=["tokens", "pairs", "fives"])
def test_stepwise_feeding_equals_full_forward(step):
    """Decode path (1-2 rows a step) and small chunks, over a CPU block memory."""
    model, _ = converted()
    ids = stream(2, 36, model=model)  # (2, 41): 5 blocks and a tail
    with torch.no_grad():
        full = model(ids).logits
        cache = LandmarkRetrievalCache(model, ALL, chunk_len=BS, memory_device="cpu")
        ours = torch.cat(
            [
                model(ids[:, i : i + step], **cache_arg(model, cache)).logits
                for i in range(0, ids.shape[1], step)
            ],
            dim=1,
        )
    torch.testing.assert_close(ours, full, atol=2e-5, rtol=1e-4)
    assert cache.stream.layers[1].memory.storage_device == torch.device("cpu")


def test_small_k_retrieves_fewer_blocks():
    """With k = 1 the distant blocks drop out: outputs differ from the full pass after the first blocks,
    and the statistics count what was read."""
    model, _ = converted()
    ids = stream(1, 100, model=model)
    with torch.no_grad():
        full = model(ids).logits
        cache = LandmarkRetrievalCache(model, RetrievalConfig(k=1), chunk_len=16)
        ours = model(ids, **cache_arg(model, cache)).logits
    # chunk 0 (positions 0..15) has at most one block in memory: exact there
    torch.testing.assert_close(ours[:, :16], full[:, :16], atol=2e-5, rtol=1e-4)
    assert (ours[:, 32:] - full[:, 32:]).abs().max() > 1e-3
    assert cache.stats.landmarks_scored > 0 and cache.stats.block_heads_fetched > 0


def test_prefill_and_decoding_with_the_kernel_equal_eager():
    """With k = 2 (fewer blocks than memory holds) a chunked prompt and token-by-token feeding take the
    fused C++ kernel (CPU, float32): the same logits as the eager path, GQA and a batch of two."""
    import landmark.inference.kernel as kn

    model, _ = converted()
    ids = stream(2, 70, model=model)
    logits, calls = {}, []
    original = kn.retrieval_step
    for kernel in ("torch", "cpp"):
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(kn, "retrieval_step", lambda *a, **kw: calls.append(1) or original(*a, **kw))
            cache = LandmarkRetrievalCache(model, RetrievalConfig(k=2, kernel=kernel), chunk_len=16)
            prompt = model(ids[:, :40], **cache_arg(model, cache)).logits
            logits[kernel] = torch.cat(
                [prompt]
                + [model(ids[:, i : i + 1], **cache_arg(model, cache)).logits for i in range(40, 80)],
                1,
            )
        if kernel == "torch":
            assert not calls
    assert len(calls) >= (3 + 40) * 2  # prompt chunks and decode steps, both layers
    torch.testing.assert_close(logits["cpp"], logits["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [40, 42], ids=["mid-block", "block-end"])
def test_generate_with_retrieval_equals_dynamic_cache(prompt_len):
    model, tok = converted()
    lid = model.config.landmark_token_id
    raw = torch.randint(0, lid, (prompt_len,), generator=torch.Generator().manual_seed(3))
    _, plain = lhf.generate(model, tok, raw, max_new_tokens=20)
    _, ours = lhf.generate(model, tok, raw, max_new_tokens=20, reading=Reading(k=64, chunk_len=16))
    _, cpu = lhf.generate(model, tok, raw, max_new_tokens=20, reading=Reading(k=64, memory_device="cpu"))
    assert torch.equal(ours, plain) and torch.equal(cpu, plain)
    assert len(plain) == 20 and lid not in plain.tolist()


def test_model_generate_with_logits_processor_batch_of_two():
    """transformers' own generate (greedy) with the retrieval cache and LandmarkLogitsProcessor inserts a
    landmark at every landmark position and generates what landmark.hf.generate does, row by row."""
    model, tok = converted()
    lid = model.config.landmark_token_id
    raw = torch.randint(0, lid, (2, 49), generator=torch.Generator().manual_seed(1))  # 7 blocks of 7 tokens
    ids = insert_landmarks(raw, BS, lid)[:, :-1]  # (2, 55): the last landmark comes from the processor
    expected = [lhf.generate(model, tok, raw[b], max_new_tokens=20)[1] for b in range(2)]
    for cache in (LandmarkRetrievalCache(model, ALL, chunk_len=16), None):  # None: a DynamicCache
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_arg(model, cache),
            logits_processor=[LandmarkLogitsProcessor.for_model(model)],
            max_new_tokens=23,  # 20 tokens + 3 landmarks
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        new = out[:, ids.shape[1] :]
        position = torch.arange(ids.shape[1], out.shape[1])
        assert bool(((new == lid) == (position % BS == BS - 1)).all())
        for b in range(2):
            assert torch.equal(new[b][new[b] != lid], expected[b])


def test_logits_processor_forces_landmarks_and_continues_from_the_token_before():
    proc = LandmarkLogitsProcessor(block_size=4, landmark_id=9)
    scores = torch.randn(2, 10)
    out = proc(torch.zeros(2, 2, dtype=torch.long), scores)  # next position 2: regular
    assert out[:, 9].eq(float("-inf")).all() and torch.equal(out[:, :9], scores[:, :9])
    forced = proc(torch.zeros(2, 3, dtype=torch.long), scores)  # next position 3: a landmark
    assert forced.argmax(-1).eq(9).all() and forced[:, :9].eq(float("-inf")).all()
    ids = torch.tensor([[0, 0, 0, 9], [0, 0, 0, 9]])
    after = proc(ids, torch.randn(2, 10))  # the landmark's own output is replaced by the kept scores
    torch.testing.assert_close(after[:, :9], scores[:, :9])


def test_unrotate_inverts_transformers_rope_at_long_positions():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model, _ = converted()
    rotary = LlamaRotaryEmbedding(model.config)
    theta = model.config.rope_parameters["rope_theta"]
    positions = torch.arange(32_000, 32_064)[None]  # far beyond the tiny model's 256 positions
    x = torch.randn(1, 2, 64, model.config.head_dim)
    cos, sin = rotary(x, positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(unrotate(rotated, positions, theta), x, atol=1e-5, rtol=1e-5)


def test_max_blocks_evicts_or_raises():
    model, _ = converted()
    ids = stream(1, 70, model=model)  # 10 blocks
    with torch.no_grad():
        cache = LandmarkRetrievalCache(model, RetrievalConfig(k=2), chunk_len=16, max_blocks=3)
        model(ids, **cache_arg(model, cache))
        assert cache.stream.layers[0].memory.count == [3] and cache.stream.layers[0].memory.evicted == [7]
        strict = LandmarkRetrievalCache(model, RetrievalConfig(k=2), chunk_len=16, max_blocks=3, evict=False)
        with pytest.raises(MemoryFullError, match="full"):
            model(ids, **cache_arg(model, strict))


def test_bad_settings_are_refused():
    model, _ = converted()
    with pytest.raises(ValueError, match="k"):
        RetrievalConfig(k=0)
    with pytest.raises(ValueError, match="chunk_len"):
        LandmarkRetrievalCache(model, ALL, chunk_len=BS - 1)
    with pytest.raises(ValueError, match="max_blocks"):
        LandmarkRetrievalCache(model, ALL, max_blocks=0)
    with pytest.raises(ValueError, match="RetrievalConfig"):
        LandmarkRetrievalCache(model, {"k": 4})
    scaled, _ = converted(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        LandmarkRetrievalCache(scaled, ALL)
    plain = transformers.LlamaForCausalLM(model.config.__class__(**model.config.to_dict()))
    plain.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="'landmark' attention"):
        LandmarkRetrievalCache(plain, ALL)
    with pytest.raises(ValueError, match="retrieval cache"):
        lhf.generate(model, None, torch.arange(5), reading=Reading(k=0, memory_device="cpu"))


def test_wrong_positions_and_bypassed_attention_are_refused():
    model, _ = converted()
    ids = stream(1, 20, model=model)
    with torch.no_grad():
        cache = LandmarkRetrievalCache(model, ALL)
        with pytest.raises(ValueError, match=r"stream positions 0\.\.21"):
            model(ids, **cache_arg(model, cache), position_ids=torch.arange(5, 5 + ids.shape[1])[None])
        cache = LandmarkRetrievalCache(model, ALL)
        model.set_attn_implementation("sdpa")  # switched after the cache was made: caught at the next layer
        try:
            with pytest.raises(RuntimeError, match="did not go through"):
                model(ids, **cache_arg(model, cache))
        finally:
            model.set_attn_implementation("landmark")
        model(
            ids, **cache_arg(model, LandmarkRetrievalCache(model, ALL))
        )  # the stale route was dropped: works again


def test_saved_state_continues_like_the_cache_that_read_the_document(tmp_path):
    """A document read once and saved: a new cache that loads it answers the question exactly as the
    cache that read it, and landmark.hf.generate continues a saved state; other weights are refused."""
    from landmark.hf.generate import hf_reader
    from landmark.inference.generate import prompt_streams

    model, tok = converted()
    lid = model.config.landmark_token_id
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(0, lid, (70,), generator=g).tolist()  # 70 = 10 blocks of 7: a landmark held back
    question = torch.randint(0, lid, (9,), generator=g).tolist()
    path = tmp_path / "doc.safetensors"
    config = RetrievalConfig(k=2)
    with torch.no_grad():
        first = LandmarkRetrievalCache(model, config, chunk_len=16)
        d_stream, d_len = prompt_streams([doc], BS, lid)
        hf_reader(model, first, 16)(d_stream, d_len)
        first.save_state(path, model)
        second = LandmarkRetrievalCache(model, config, chunk_len=16)
        second.load_state(path, model)
        assert second.get_seq_length() == first.get_seq_length() == 70 + 70 // 7 - 1
        q_stream, q_len = prompt_streams([question], BS, lid, start=[first.get_seq_length()])
        want = hf_reader(model, first, 16)(q_stream, q_len)
        got = hf_reader(model, second, 16)(q_stream, q_len)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    two = Reading(k=2)
    _, a = lhf.generate(
        model, tok, torch.tensor(doc), 3, reading=two, state=StateFiles(save=tmp_path / "g.st")
    )
    _, b = lhf.generate(
        model, tok, torch.tensor(question), 6, reading=two, state=StateFiles(load=tmp_path / "g.st")
    )
    assert len(a) == 3 and len(b) == 6
    other, _ = converted(seed=1)
    with pytest.raises(ValueError, match="saved for other weights"):
        LandmarkRetrievalCache(other, config).load_state(path, other)
    with pytest.raises(ValueError, match="states of the retrieval cache"):
        lhf.generate(model, tok, torch.tensor(question), 2, state=StateFiles(load=path))
