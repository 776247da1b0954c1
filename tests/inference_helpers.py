"""Helpers shared by the inference tests."""

from __future__ import annotations

import torch

from landmark.inference import BlockMemory, LayerInputs, MemoryOptions, Step, retrieval_attention


def random_memory(
    batch: int,
    kv_heads: int,
    n_blocks: list[int],
    bs: int,
    d: int,
    seed: int,
    same_landmarks: bool = False,
    **kw,
) -> BlockMemory:
    """A float32 CPU BlockMemory (RoPE base 10000) with ``n_blocks[b]`` blocks of random keys and values in
    row b; ``same_landmarks``: every landmark key of a row alike, as in a model's first layer."""
    g = torch.Generator().manual_seed(seed)
    index = kw.pop("index", None)
    memory = BlockMemory((batch, kv_heads, bs, d), rope_base=10000.0, dtype=torch.float32, device="cpu",
                         options=MemoryOptions(**kw), index=index)  # fmt: skip
    for b, n in enumerate(n_blocks):
        first = None
        for _ in range(n):
            keys = torch.randn(kv_heads, 1, bs, d, generator=g)
            if same_landmarks:
                first = keys[:, :, -1].clone() if first is None else first
                keys[:, :, -1] = first
            memory.append(b, keys, torch.randn(kv_heads, 1, bs, d, generator=g))
    return memory


def attend(q, local_k, local_v, local_len, q_start, q_len, memory, retrieval, bs, rope_base, scale,
           stats=None, plan=None):  # fmt: skip
    """``retrieval_attention`` of a step given field by field (shapes as in ``LayerInputs`` / ``Step``)."""
    inputs = LayerInputs(q, local_k, local_v, memory, scale)
    step = Step.of(inputs, (local_len, q_start, q_len), retrieval, bs, rope_base)
    return retrieval_attention(inputs, step, stats, plan)


def kernel_step(q, local_k, local_v, local_len, q_start, q_len, memory, k, scale):
    """``kernel.retrieval_step`` of a step given field by field (the kernel selects)."""
    from landmark.inference import RetrievalConfig
    from landmark.inference import kernel as kn

    inputs = LayerInputs(q, local_k, local_v, memory, scale)
    step = Step.of(
        inputs, (local_len, q_start, q_len), RetrievalConfig(k=k), memory.block_size, memory.rope_base
    )
    return kn.retrieval_step(inputs, step, kn.kernel_plan(kn.kernel_module(required=True), step, k))
