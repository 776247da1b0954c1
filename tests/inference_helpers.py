"""Helpers shared by the inference tests."""

from __future__ import annotations

import torch

from landmark.inference import BlockMemory


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
    memory = BlockMemory(batch, kv_heads, bs, d, rope_base=10000.0, dtype=torch.float32, device="cpu", **kw)
    for b, n in enumerate(n_blocks):
        first = None
        for _ in range(n):
            keys = torch.randn(kv_heads, 1, bs, d, generator=g)
            if same_landmarks:
                first = keys[:, :, -1].clone() if first is None else first
                keys[:, :, -1] = first
            memory.append(b, keys, torch.randn(kv_heads, 1, bs, d, generator=g))
    return memory
